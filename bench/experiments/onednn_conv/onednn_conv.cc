// Experiment: oneDNN 3.x NHWC/HWIO float32 2D convolution (forward, backward-data, backward-weights) as XLA FFI handlers.
#include <cstdint>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  memory::dims src, wei, dst, strides, pad_l, pad_r;
  std::string Key(const char* kind) const {
    std::ostringstream s;
    s << kind;
    for (auto* d : {&src, &wei, &dst, &strides, &pad_l, &pad_r}) {
      s << '|';
      for (auto v : *d) s << v << ',';
    }
    return s.str();
  }
};

// x [B,H,W,C] (nhwc), w [KH,KW,C,K] (hwio), y [B,Ho,Wo,K] (nhwc); oneDNN dims are logical NCHW / OIHW.
Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y, int64_t sh,
                      int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Geometry{{x[0], x[3], x[1], x[2]}, {w[3], w[2], w[0], w[1]}, {y[0], y[3], y[1], y[2]}, {sh, sw}, {pt, pl},
                  {pb, pr}};
}

memory::desc Md(const memory::dims& d, tag t) { return memory::desc(d, dt::f32, t); }

memory::desc Nhwc(const memory::dims& d) { return Md(d, tag::nhwc); }
memory::desc Hwio(const Geometry& g) { return Md(g.wei, tag::hwio); }

dnnl::convolution_forward::primitive_desc FwdPd(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_training,
                                                   dnnl::algorithm::convolution_direct, Nhwc(g.src),
                                                   Md(g.wei, tag::any), Nhwc(g.dst), g.strides, g.pad_l, g.pad_r);
}

// A primitive, the weights layout it chose (tag::any) and the reorder between that layout and the user's HWIO: from
// HWIO for the forward and backward-data primitives (they read weights), to HWIO for backward-weights (it writes).
template <class Primitive>
struct Entry {
  Primitive prim;
  memory::desc weights;
  dnnl::reorder reorder;
  bool needs_reorder;
};

std::mutex cache_mu;

// The cached Entry for `key`, built by make_pd() on first use.
template <class Primitive, class MakePd>
Entry<Primitive>& Cached(const std::string& key, const Geometry& g, bool writes_weights, MakePd make_pd) {
  static std::unordered_map<std::string, Entry<Primitive>> cache;
  std::lock_guard<std::mutex> lock(cache_mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto pd = make_pd();
  memory::desc weights = writes_weights ? pd.diff_weights_desc() : pd.weights_desc();
  bool needs_reorder = weights != Hwio(g);
  dnnl::reorder reorder;
  if (needs_reorder) {
    memory user(Hwio(g), Engine()), own(weights, Engine());
    reorder = writes_weights ? dnnl::reorder(own, user) : dnnl::reorder(user, own);
  }
  return cache.emplace(key, Entry<Primitive>{Primitive(pd), weights, reorder, needs_reorder}).first->second;
}

// The user's HWIO weights in the layout `entry` reads (reordered into a new buffer when they differ).
template <class Primitive>
memory WeightsFor(const Entry<Primitive>& entry, memory user, dnnl::stream& s) {
  if (!entry.needs_reorder) return user;
  memory own(entry.weights, Engine());
  entry.reorder.execute(s, user, own);
  return own;
}

template <class Body>
ffi::Error Run(Body body) {
  try {
    body();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, err.what());
  }
  return ffi::Error::Success();
}

// x [B,H,W,C], w [KH,KW,C,K] -> y [B,Ho,Wo,K]
ffi::Error ConvFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run([&] {
    auto g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
    auto& e = Cached<dnnl::convolution_forward>(g.Key("f"), g, false, [&] { return FwdPd(g); });
    dnnl::stream s(Engine());
    memory wei = WeightsFor(e, memory(Hwio(g), Engine(), w.typed_data()), s);
    memory src(Nhwc(g.src), Engine(), x.typed_data()), dst(Nhwc(g.dst), Engine(), y->typed_data());
    e.prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    s.wait();
  });
}

// dy [B,Ho,Wo,K], w [KH,KW,C,K] -> dx [B,H,W,C]
ffi::Error ConvBwdDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx,
                           int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run([&] {
    auto g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
    auto& e = Cached<dnnl::convolution_backward_data>(g.Key("d"), g, false, [&] {
      return dnnl::convolution_backward_data::primitive_desc(Engine(), dnnl::algorithm::convolution_direct,
                                                             Nhwc(g.src), Md(g.wei, tag::any), Nhwc(g.dst),
                                                             g.strides, g.pad_l, g.pad_r, FwdPd(g));
    });
    dnnl::stream s(Engine());
    memory wei = WeightsFor(e, memory(Hwio(g), Engine(), w.typed_data()), s);
    memory diff_src(Nhwc(g.src), Engine(), dx->typed_data()), diff_dst(Nhwc(g.dst), Engine(), dy.typed_data());
    e.prim.execute(s, {{DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DIFF_DST, diff_dst}});
    s.wait();
  });
}

// x [B,H,W,C], dy [B,Ho,Wo,K] -> dw [KH,KW,C,K]
ffi::Error ConvBwdWeiImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                          int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run([&] {
    auto g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
    auto& e = Cached<dnnl::convolution_backward_weights>(g.Key("w"), g, true, [&] {
      return dnnl::convolution_backward_weights::primitive_desc(Engine(), dnnl::algorithm::convolution_direct,
                                                                Nhwc(g.src), Md(g.wei, tag::any), Nhwc(g.dst),
                                                                g.strides, g.pad_l, g.pad_r, FwdPd(g));
    });
    dnnl::stream s(Engine());
    memory user(Hwio(g), Engine(), dw->typed_data());
    memory wei = e.needs_reorder ? memory(e.weights, Engine()) : user;
    memory src(Nhwc(g.src), Engine(), x.typed_data()), diff_dst(Nhwc(g.dst), Engine(), dy.typed_data());
    e.prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, wei}, {DNNL_ARG_DIFF_DST, diff_dst}});
    if (e.needs_reorder) e.reorder.execute(s, wei, user);
    s.wait();
  });
}

}  // namespace

#define CONV_ATTRS                                                                                          \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb").Attr<int64_t>("pl").Attr< \
      int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdConvFwd, ConvFwdImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<
                                  ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LdConvBwdData, ConvBwdDataImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<
                                  ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LdConvBwdWei, ConvBwdWeiImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<
                                  ffi::Buffer<ffi::F32>>() CONV_ATTRS);
