"""The emoji recipe: both stages trained on real pictures nobody here drew (the Noto emoji set), and measured.

    latentdiff emoji-train --workdir workdirs/emoji --data data/emoji --out emoji_out      (make emoji-train)

Runs, resumably (Ctrl-C and run again continues where it stopped):
  1. data: `latentdiff emoji --out DATA` (npm pack, or --tarball) unless DATA/meta.json exists;
  2. stage 1 (configs/autoencoder_kl_f4.py:emoji), the train split's latents, stage 2
     (configs/ldm_txt2img_kl8.py:emoji): the user's own-folder path (data.name=folder), through train.py's code;
  3. the category classifier (`latentdiff eval category`) on the training images, WORKDIR/category.safetensors;
  4. the report, OUT/report.json and OUT/grid.png:
     - stage 1 on the held-out images: PSNR against the bicubic baseline that keeps as many values as the latent,
       LPIPS (with --lpips_weights), rFID and rKID;
     - stage 2: the guidance scale chosen by category accuracy on the validation captions (training captions held
       out of training); on the held-out captions at guidance 1 and at the chosen scale: the classifier's category
       accuracy (all, base emoji, balanced), FID and KID against the held-out images, and the memorisation ratio
       (nearest training image in Inception space, generated vs real held-out images);
     - the grid: held-out and made-up captions, each generated image beside its nearest training image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

import latentdiff  # noqa: F401  (CPU XLA flags)
from latentdiff import errors, progress
from latentdiff.demo import apply_stage_overrides, repo_root, run_stages, set_fid_weights
from latentdiff.errors import UserError

AE_CONFIG = "configs/autoencoder_kl_f4.py:emoji"
LDM_CONFIG = "configs/ldm_txt2img_kl8.py:emoji"
SCORE_SEED = 1234
SAMPLE_BATCH = 128  # images per sampling call (the last one is padded)
INCEPTION_BATCH = 50
PREPROCESS = "paper"  # the FID preprocessing of the paper (TF1 bilinear resize)
ENCODE_BATCH_MAX = 128
GRID_MADE_UP = ("a red face", "a green apple", "a blue heart", "a yellow flag", "a cat face with sunglasses")
GRID_HELDOUT = 7  # held-out captions in the grid (base emoji, spread over the categories)


def largest_divisor(n: int, limit: int) -> int:
    """The largest d <= limit dividing n (the latents encoder drops a last partial batch)."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def prepare_data(data: str, tarball: str) -> None:
    """Writes the emoji folders into DATA unless DATA/meta.json says they are there."""
    from latentdiff.data import emoji

    if os.path.isfile(os.path.join(data, "meta.json")):
        return
    with progress.phase(f"writing the emoji set into {data}"):
        emoji.check_replaceable(data)
        if tarball:
            emoji.write_dataset(tarball, data)
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as directory:
                emoji.write_dataset(emoji.fetch_tarball(directory), data)


def configs(data: str, overrides: list[str]) -> tuple[Any, Any]:
    from latentdiff.config_utils import load_config

    ae_config = load_config(os.path.join(repo_root(), AE_CONFIG))
    ldm_config = load_config(os.path.join(repo_root(), LDM_CONFIG))
    for config in (ae_config, ldm_config):
        config.data.folder = os.path.join(data, "train")
        config.data.folder_heldout = os.path.join(data, "heldout")
    apply_stage_overrides(ae_config, ldm_config, overrides)
    if ae_config.data.folder_num_validation != ldm_config.data.folder_num_validation:
        raise UserError("ae.data.folder_num_validation and ldm.data.folder_num_validation must be equal (latents)")
    return ae_config, ldm_config


def classifier(workdir: str, data: str, steps: int) -> tuple[dict, tuple[str, ...], dict]:
    """(params, label names, its report): trained once into WORKDIR/category.safetensors, then reused."""
    from latentdiff.evaluation import category

    path = os.path.join(workdir, "category.safetensors")
    report_path = os.path.join(workdir, "category.json")
    if not (os.path.isfile(path) and os.path.isfile(report_path)):  # both, or train again (a run killed in between)
        with progress.phase("training the category classifier on the training images"):
            args = ["--train", os.path.join(data, "train"), "--heldout", os.path.join(data, "heldout"), "--out", path]
            args += ["--steps", str(steps)]
            report = category.run(category.parse_args(args))
        from latentdiff.config_utils import atomic_write_text

        atomic_write_text(report_path, json.dumps(report, indent=2))
    params, names, _ = category.load_classifier(path)
    return params, names, json.load(open(report_path))


def in_batches(fn: Any, images: np.ndarray, batch: int) -> np.ndarray:
    """fn over fixed-size batches (one compile): the last batch is padded with copies of its first row."""
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), axis=0)])
        out.append(np.asarray(fn(padded))[: len(chunk)])
    return np.concatenate(out)


def stage1_scores(
    pipe: Any, heldout: np.ndarray, heldout_feats: np.ndarray, feats: Any, lpips_weights: str, factor: int
) -> dict[str, Any]:
    """Reconstruction of the held-out images [N, R, R, 3] uint8 (Inception features [N, D]) against the bicubic
    baseline of equal size."""
    from latentdiff.evaluation import recipe_scores
    from latentdiff.imaging import to_uint8

    reconstructions = to_uint8(in_batches(lambda x: pipe.autoencode(x)[1], heldout, 64))
    channels = pipe.first_stage.config.embed_dim
    side = recipe_scores.baseline_side(heldout.shape[1], factor, channels)
    bicubic = recipe_scores.bicubic_round_trip(heldout, side)
    scores: dict[str, Any] = {
        "images": len(heldout),
        "psnr": float(recipe_scores.psnr_per_image(heldout, reconstructions).mean()),
        "bicubic_psnr": float(recipe_scores.psnr_per_image(heldout, bicubic).mean()),
        "bicubic_side": side,
        "latent": f"{heldout.shape[1] // factor}x{heldout.shape[1] // factor}x{channels}",
    }
    scores["psnr_gain_db"] = scores["psnr"] - scores["bicubic_psnr"]
    if lpips_weights:
        import jax
        import jax.numpy as jnp

        from latentdiff.convert.lpips_weights import require_lpips_params
        from latentdiff.nn.lpips import lpips_distance

        params = require_lpips_params(lpips_weights)
        distance = jax.jit(lambda a, b: lpips_distance(params, a, b, dtype=jnp.float32))
        pairs = np.concatenate([heldout, reconstructions], axis=-1)
        per_image = in_batches(
            lambda p: distance(p[..., :3] / 127.5 - 1.0, p[..., 3:] / 127.5 - 1.0), pairs.astype(np.float32), 64
        )
        scores["lpips"] = float(per_image.mean())
    rec_feats = feats(reconstructions)
    scores |= {f"r{k}": v for k, v in recipe_scores.fid_and_kid(rec_feats, heldout_feats, SCORE_SEED).items()}
    return scores


def generate(pipe: Any, captions: list[str], guidance: float, sampling: Any) -> np.ndarray:
    return pipe(
        captions,
        sampler=sampling.sampler,
        steps=sampling.steps,
        guidance=guidance,
        seed=SCORE_SEED,
        batch_size=min(SAMPLE_BATCH, len(captions)),
    )


def grid_prompts(heldout_captions: list[str], heldout_labels: np.ndarray) -> list[str]:
    """GRID_HELDOUT base-emoji held-out captions, one per category in turn, then the made-up ones."""
    from latentdiff.evaluation.recipe_scores import is_base_caption

    base = is_base_caption(heldout_captions)
    picked: list[str] = []
    for label in np.unique(heldout_labels):
        rows = [i for i in np.flatnonzero((heldout_labels == label) & base)]
        if rows and len(picked) < GRID_HELDOUT:
            picked.append(heldout_captions[rows[0]])
    return picked + list(GRID_MADE_UP)


def report(args: argparse.Namespace, ldm_config: Any) -> dict[str, Any]:
    """Scores both stages (see the module docstring) -> the report dict; writes OUT/report.json and OUT/grid.png."""
    from latentdiff.config_utils import atomic_write_text
    from latentdiff.data import folder as folder_lib
    from latentdiff.evaluation import category, recipe_scores
    from latentdiff.evaluation.fid import load_inception_weights
    from latentdiff.imaging import grid, save_png
    from latentdiff.metrics import inception_features
    from latentdiff.pipeline import Pipeline

    workdir, data, out = args.workdir, args.data, args.out
    start = time.perf_counter()
    params, names, classifier_report = classifier(workdir, data, args.classifier_steps)
    pipe = Pipeline.from_workdir(os.path.join(workdir, "ldm"))
    resolution = pipe.resolution
    inception = load_inception_weights(ldm_config.evaluation.inception_weights)

    def feats(images: np.ndarray) -> np.ndarray:
        return inception_features(inception, images, INCEPTION_BATCH, PREPROCESS)[0]

    all_train_images, _, _ = category.read_labelled_folder(os.path.join(data, "train"), resolution)
    held_images, held_labels, held_names = category.read_labelled_folder(os.path.join(data, "heldout"), resolution)
    held_labels = category.relabel(held_labels, held_names, names, os.path.join(data, "heldout"))
    held_captions = [e.caption for e in folder_lib.scan_folder(os.path.join(data, "heldout")).entries]
    train_index = folder_lib.scan_folder(os.path.join(data, "train"))
    validation = folder_lib.split_entries(train_index, ldm_config.data.folder_num_validation)["validation"]
    val_captions = [e.caption for e in validation]
    held_back = set(validation)
    trained = np.asarray([e not in held_back for e in train_index.entries])  # what stage 2 learned from
    train_images = all_train_images[trained]
    train_captions = [e.caption for e, keep in zip(train_index.entries, trained, strict=True) if keep]
    val_labels = category.relabel(
        np.asarray([e.label for e in validation]), train_index.label_names, names, os.path.join(data, "train")
    )
    result: dict[str, Any] = {"classifier": classifier_report}
    with progress.phase(f"Inception features of {len(train_images)} training and {len(held_images)} held-out images"):
        train_feats, held_feats = feats(train_images), feats(held_images)
    with progress.phase("stage 1 on the held-out images"):
        factor = pipe.first_stage.downsample_factor
        result["stage1"] = stage1_scores(pipe, held_images, held_feats, feats, args.lpips_weights, factor)
    s = ldm_config.evaluation
    sampling = argparse.Namespace(sampler=s.sampler, steps=s.steps)
    result["sampling"] = {"sampler": s.sampler, "steps": s.steps, "seed": SCORE_SEED}
    validation_scores = {}
    for scale in args.guidances:
        with progress.phase(f"validation captions at guidance {scale:g}: {len(val_captions)} images"):
            probabilities = category.predict(params, generate(pipe, val_captions, scale, sampling), 256)
        base = recipe_scores.is_base_caption(val_captions)
        validation_scores[scale] = recipe_scores.category_scores(probabilities, val_labels, base)
    chosen = recipe_scores.pick_guidance({k: v["balanced_accuracy"] for k, v in validation_scores.items()})
    result["validation"] = {f"{k:g}": v for k, v in validation_scores.items()}
    result["chosen_guidance"] = chosen
    held_base = recipe_scores.is_base_caption(held_captions)
    heldout_images = {}
    for scale in sorted({1.0, chosen}):
        with progress.phase(f"held-out captions at guidance {scale:g}: {len(held_captions)} images"):
            images = generate(pipe, held_captions, scale, sampling)
            heldout_images[scale] = images
            gen_feats = feats(images)
            probabilities = category.predict(params, images, 256)
        result[f"heldout@{scale:g}"] = {
            "category": recipe_scores.category_scores(probabilities, held_labels, held_base),
            **recipe_scores.fid_and_kid(gen_feats, held_feats, SCORE_SEED),
            "memorisation": recipe_scores.memorisation(gen_feats, held_feats, train_feats),
        }
    real = category.predict(params, held_images, 256)
    result["real_heldout_category"] = recipe_scores.category_scores(real, held_labels, held_base)
    with progress.phase("the grid: held-out and made-up captions beside their nearest training image"):
        prompts = grid_prompts(held_captions, held_labels)
        images = generate(pipe, prompts, chosen, sampling)
        _, nearest_rows = recipe_scores.nearest(feats(images), train_feats)
        tiles = np.stack([x for pair in zip(images, train_images[nearest_rows], strict=True) for x in pair])
        labels = [t for p, i in zip(prompts, nearest_rows, strict=True) for t in (p, f"nearest: {train_captions[i]}")]
        os.makedirs(out, exist_ok=True)
        save_png(grid(tiles, labels, columns=6, scale=2, caption_lines=3), os.path.join(out, "grid.png"))
    result["grid_prompts"] = prompts
    result["report_seconds"] = time.perf_counter() - start
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(result, indent=2))
    return result


def summary(result: dict[str, Any]) -> str:
    s1 = result["stage1"]
    lines = [
        f"stage 1 (held-out, {s1['images']} images, latent {s1['latent']}): PSNR {s1['psnr']:.2f} dB vs bicubic "
        f"{s1['bicubic_psnr']:.2f} dB ({s1['psnr_gain_db']:+.2f}), LPIPS {s1.get('lpips', float('nan')):.3f}, "
        f"rFID {s1['rfid']:.1f}, rKID {s1['rkid']:.4f}",
        f"classifier on real held-out images: accuracy {result['real_heldout_category']['accuracy']:.3f}, "
        f"base {result['real_heldout_category']['base_accuracy']:.3f}, balanced "
        f"{result['real_heldout_category']['balanced_accuracy']:.3f}",
        f"guidance chosen on the validation captions: {result['chosen_guidance']:g}",
        f"{'held-out captions':<22}{'acc':>7}{'base':>7}{'bal':>7}{'FID':>8}{'KID':>9}{'memo':>7}",
    ]
    for key, value in result.items():
        if key.startswith("heldout@"):
            c = value["category"]
            lines.append(
                f"{'guidance ' + key.split('@')[1]:<22}{c['accuracy']:>7.3f}{c['base_accuracy']:>7.3f}"
                f"{c['balanced_accuracy']:>7.3f}{value['fid']:>8.1f}{value['kid']:>9.4f}"
                f"{value['memorisation']['ratio']:>7.2f}"
            )
    chance = result["real_heldout_category"]
    lines.append(f"chance (most common category): all {chance['chance']:.3f}, base {chance['base_chance']:.3f}")
    return "\n".join(lines)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """make emoji-train: data, both stages, classifier, report. Returns the report (or {'stopped': ...})."""
    from latentdiff.config_utils import atomic_write_text

    if not args.guidances or min(args.guidances) < 1.0 or args.classifier_steps < 1:
        raise UserError("--guidances must be one or more scales >= 1 and --classifier_steps >= 1")
    from latentdiff.output_paths import check_output_dir

    check_output_dir(args.out, "--out")  # written after 90 minutes: checked before the first
    if args.lpips_weights and not os.path.isfile(args.lpips_weights):
        raise UserError(f"--lpips_weights {args.lpips_weights}: no such file (fetch: latentdiff fetch-lpips-weights)")
    ae_config, ldm_config = configs(args.data, args.override)  # overrides checked before anything is written
    prepare_data(args.data, args.tarball)
    set_fid_weights(ae_config, ldm_config)
    ae_config.evaluation.lpips_weights = args.lpips_weights
    num_validation = ae_config.data.folder_num_validation
    from latentdiff.data import folder as folder_lib

    train_entries = folder_lib.split_entries(folder_lib.scan_folder(ae_config.data.folder), num_validation)["train"]
    stopped = run_stages(args.workdir, ae_config, ldm_config, largest_divisor(len(train_entries), ENCODE_BATCH_MAX))
    if stopped:
        return stopped
    start = time.perf_counter()
    result = report(args, ldm_config)
    timings_path = os.path.join(args.workdir, "timings.json")
    timings = json.load(open(timings_path)) | {"report": time.perf_counter() - start}
    atomic_write_text(timings_path, json.dumps(timings, indent=2))
    result["wall_seconds"] = timings
    result["configs"] = [AE_CONFIG, LDM_CONFIG]
    result["overrides"] = args.override
    atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(result, indent=2))
    print(summary(result))
    print(f"grid: {os.path.join(args.out, 'grid.png')}  report: {os.path.join(args.out, 'report.json')}")
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="latentdiff emoji-train", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdirs/emoji", help="both stages, latents, classifier (resumable)")
    parser.add_argument("--data", default="data/emoji", help="the emoji folders (written here when missing)")
    parser.add_argument("--tarball", default="", help="emoji-datasource-google-16.0.0.tgz (default: npm pack)")
    parser.add_argument("--out", default="emoji_out", help="report.json and grid.png")
    parser.add_argument("--lpips_weights", default="", help="LPIPS weights for stage 1's LPIPS ('' = not reported)")
    parser.add_argument("--guidances", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0], help="tried on validation")
    parser.add_argument("--classifier_steps", type=int, default=1500, help="training steps of the category classifier")
    parser.add_argument("--override", action="append", default=[], help="ae.FIELD=VALUE or ldm.FIELD=VALUE")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    errors.run_cli(lambda: train(args))


if __name__ == "__main__":
    main(sys.argv[1:])
