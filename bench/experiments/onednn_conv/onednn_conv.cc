// Spike: oneDNN 3.x NHWC/HWIO float32 2D convolution (forward, backward-data, backward-weights) as XLA FFI handlers.
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

dnnl::convolution_forward::primitive_desc FwdPd(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, Md(g.src, tag::nhwc),
      Md(g.wei, tag::any), Md(g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r);
}

struct FwdEntry {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward prim;
  dnnl::reorder wei_reorder;
  bool needs_reorder;
};
struct BwdDataEntry {
  dnnl::convolution_backward_data::primitive_desc pd;
  dnnl::convolution_backward_data prim;
  dnnl::reorder wei_reorder;
  bool needs_reorder;
};
struct BwdWeiEntry {
  dnnl::convolution_backward_weights::primitive_desc pd;
  dnnl::convolution_backward_weights prim;
  dnnl::reorder wei_reorder;
  bool needs_reorder;
};

std::mutex cache_mu;
std::unordered_map<std::string, FwdEntry> fwd_cache;
std::unordered_map<std::string, BwdDataEntry> bwd_data_cache;
std::unordered_map<std::string, BwdWeiEntry> bwd_wei_cache;

FwdEntry& GetFwd(const Geometry& g) {
  std::lock_guard<std::mutex> lock(cache_mu);
  auto key = g.Key("f");
  auto it = fwd_cache.find(key);
  if (it != fwd_cache.end()) return it->second;
  auto pd = FwdPd(g);
  auto user = Md(g.wei, tag::hwio);
  bool re = pd.weights_desc() != user;
  dnnl::reorder r = re ? dnnl::reorder(memory(user, Engine()), memory(pd.weights_desc(), Engine())) : dnnl::reorder();
  return fwd_cache.emplace(key, FwdEntry{pd, dnnl::convolution_forward(pd), r, re}).first->second;
}

BwdDataEntry& GetBwdData(const Geometry& g) {
  std::lock_guard<std::mutex> lock(cache_mu);
  auto key = g.Key("d");
  auto it = bwd_data_cache.find(key);
  if (it != bwd_data_cache.end()) return it->second;
  auto hint = FwdPd(g);
  auto pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, Md(g.src, tag::nhwc), Md(g.wei, tag::any), Md(g.dst, tag::nhwc),
      g.strides, g.pad_l, g.pad_r, hint);
  auto user = Md(g.wei, tag::hwio);
  bool re = pd.weights_desc() != user;
  dnnl::reorder r = re ? dnnl::reorder(memory(user, Engine()), memory(pd.weights_desc(), Engine())) : dnnl::reorder();
  return bwd_data_cache.emplace(key, BwdDataEntry{pd, dnnl::convolution_backward_data(pd), r, re}).first->second;
}

BwdWeiEntry& GetBwdWei(const Geometry& g) {
  std::lock_guard<std::mutex> lock(cache_mu);
  auto key = g.Key("w");
  auto it = bwd_wei_cache.find(key);
  if (it != bwd_wei_cache.end()) return it->second;
  auto hint = FwdPd(g);
  auto pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, Md(g.src, tag::nhwc), Md(g.wei, tag::any), Md(g.dst, tag::nhwc),
      g.strides, g.pad_l, g.pad_r, hint);
  auto user = Md(g.wei, tag::hwio);
  bool re = pd.diff_weights_desc() != user;
  dnnl::reorder r =
      re ? dnnl::reorder(memory(pd.diff_weights_desc(), Engine()), memory(user, Engine())) : dnnl::reorder();
  return bwd_wei_cache.emplace(key, BwdWeiEntry{pd, dnnl::convolution_backward_weights(pd), r, re}).first->second;
}

ffi::Error ConvFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  try {
    auto g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
    auto& e = GetFwd(g);
    dnnl::stream s(Engine());
    memory src(Md(g.src, tag::nhwc), Engine(), x.typed_data());
    memory dst(Md(g.dst, tag::nhwc), Engine(), y->typed_data());
    memory user_w(Md(g.wei, tag::hwio), Engine(), w.typed_data());
    memory wei = user_w;
    if (e.needs_reorder) {
      wei = memory(e.pd.weights_desc(), Engine());
      e.wei_reorder.execute(s, user_w, wei);
    }
    e.prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, err.what());
  }
  return ffi::Error::Success();
}

// dy [B,Ho,Wo,K], w [KH,KW,C,K] -> dx [B,H,W,C]
ffi::Error ConvBwdDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx,
                           int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  try {
    auto g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
    auto& e = GetBwdData(g);
    dnnl::stream s(Engine());
    memory diff_src(Md(g.src, tag::nhwc), Engine(), dx->typed_data());
    memory diff_dst(Md(g.dst, tag::nhwc), Engine(), dy.typed_data());
    memory user_w(Md(g.wei, tag::hwio), Engine(), w.typed_data());
    memory wei = user_w;
    if (e.needs_reorder) {
      wei = memory(e.pd.weights_desc(), Engine());
      e.wei_reorder.execute(s, user_w, wei);
    }
    e.prim.execute(s, {{DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DIFF_DST, diff_dst}});
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, err.what());
  }
  return ffi::Error::Success();
}

// x [B,H,W,C], dy [B,Ho,Wo,K] -> dw [KH,KW,C,K]
ffi::Error ConvBwdWeiImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                          int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  try {
    auto g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
    auto& e = GetBwdWei(g);
    dnnl::stream s(Engine());
    memory src(Md(g.src, tag::nhwc), Engine(), x.typed_data());
    memory diff_dst(Md(g.dst, tag::nhwc), Engine(), dy.typed_data());
    memory user_w(Md(g.wei, tag::hwio), Engine(), dw->typed_data());
    memory wei = e.needs_reorder ? memory(e.pd.diff_weights_desc(), Engine()) : user_w;
    e.prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, wei}, {DNNL_ARG_DIFF_DST, diff_dst}});
    if (e.needs_reorder) e.wei_reorder.execute(s, wei, user_w);
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, err.what());
  }
  return ffi::Error::Success();
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
