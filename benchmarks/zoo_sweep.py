"""Sweep timm architectures through the engine: what real models break (random weights, nothing
is downloaded: ``timm.create_model(name, pretrained=False)``).

Per model, one subprocess each (memory is freed between models; a crash or a hang costs one row),
batch 2 at a small input (``SPECS``: 32 px unless the architecture needs more):

- every composite in ``lrp.composites.names()`` explains the model (``epsilon-gamma-box`` with
  ``input_bounds=(-3, 3)``): ok, or the error's first line; the prepared copy's logits against
  the model's (largest relative gap over the composites that ran);
- LRP-0 conservation in float64 (``lrp-0``, ``zero_bias=True``, ``stabilizer=0``, BatchNorm
  scales without shifts, ``attention="cp"``, which is exactly conservative; the relevance that
  constant tokens absorb counts as conserved): max over the batch of
  ``|sum R + absorbed - initial| / |initial|`` (tests/zoo_checks.py expects < 1e-8). Linear and
  convolution biases are zeroed too: they are shifts like BatchNorm's, and with them the
  bias-free denominators can be ~0 where the pre-activation is not, so the relevance cancels at
  up to 1e80 x the logit (random convmixer_768_32, inception_resnet_v2, rdnet_tiny) and
  float64 rounding alone exceeds any tolerance (see ``check_lrp0_conserves``);
- otsuki2024 conservation in float32 (default ``attention=``): tests/zoo_checks.py expects < 1e-4
  for CNNs; for models with attention (AttnLRP's softmax rule has a bias term) informational.

Models get the zoo tests' random normalisation statistics (:func:`zoo_checks.randomize_statistics`);
Linear/Conv weights that timm initialises to zero (ViT and Mixer heads) are drawn at random.

    nice -n 19 python benchmarks/zoo_sweep.py [--markdown] [--jsonl FILE] [names...]
    nice -n 19 python benchmarks/zoo_sweep.py --one NAME   # one model, a JSON line
    python benchmarks/zoo_sweep.py --table AFTER.jsonl [--before BEFORE.jsonl]  # render
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# name -> (input px, extra create_model kwargs, has attention); absent: (32, {}, False)
ATTN = True
SPECS: dict[str, tuple[int, dict[str, Any], bool]] = {
    "inception_v3": (75, {}, False),
    "inception_v4": (75, {}, False),
    "inception_resnet_v2": (75, {}, False),
    "legacy_xception": (71, {}, False),
    "hrnet_w18_small": (64, {}, False),
    "hrnet_w18_small_v2": (64, {}, False),
    "dla34": (64, {}, False),
    "vit_tiny_patch16_224": (32, {"img_size": 32}, ATTN),
    "deit_tiny_patch16_224": (32, {"img_size": 32}, ATTN),
    "deit_tiny_distilled_patch16_224": (32, {"img_size": 32}, ATTN),
    "vit_small_patch16_224": (32, {"img_size": 32}, ATTN),
    "beit_base_patch16_224": (32, {"img_size": 32}, ATTN),
    "eva02_tiny_patch14_224": (28, {"img_size": 28}, ATTN),
    "swin_tiny_patch4_window7_224": (64, {"img_size": 64, "window_size": 2}, ATTN),
    "swinv2_tiny_window8_256": (64, {"img_size": 64, "window_size": 2}, ATTN),
    "levit_128s": (64, {"img_size": 64}, ATTN),
    "mobilevit_xxs": (64, {}, ATTN),
    "mobilevitv2_050": (64, {}, ATTN),
    "coatnet_nano_rw_224": (64, {"img_size": 64}, ATTN),
    "maxvit_nano_rw_256": (64, {"img_size": 64}, ATTN),
    "efficientformer_l1": (224, {}, ATTN),  # attention biases fixed to a 7x7 last stage
    "efficientformerv2_s0": (64, {"img_size": 64}, ATTN),
    "edgenext_xx_small": (64, {}, ATTN),
    "poolformer_s12": (32, {}, False),
    "poolformerv2_s12": (32, {}, False),
    "convformer_s18": (32, {}, False),
    "caformer_s18": (32, {}, ATTN),
    "pit_ti_224": (64, {"img_size": 64}, ATTN),
    "tiny_vit_5m_224": (64, {}, ATTN),
    "ghostnetv2_100": (64, {}, False),
    "botnet26t_256": (64, {"img_size": 64}, ATTN),
    "halonet26t": (256, {}, ATTN),  # halo blocks need every stage a multiple of 8 px
    "bat_resnext26ts": (256, {}, False),
    "fastvit_t8": (64, {}, False),
    "pvt_v2_b0": (64, {}, ATTN),
    "mixer_s16_224": (32, {"img_size": 32}, False),
    "gcresnet33ts": (32, {}, ATTN),  # global context: softmax over positions, then a matmul
    "efficientvit_m0": (64, {"img_size": 64}, ATTN),
    "xcit_nano_12_p16_224": (32, {"img_size": 32}, ATTN),
    "cait_xxs24_224": (32, {"img_size": 32}, ATTN),
    "resmlp_12_224": (32, {"img_size": 32}, False),
    # added at stop 21
    "visformer_tiny": (64, {"img_size": 64}, ATTN),
    "csatv2": (64, {}, ATTN),  # timm Attention blocks in the last stages
    "gcvit_xxtiny": (224, {}, ATTN),  # window attention fixed to a 7x7 last stage
    "nextvit_small": (32, {}, ATTN),
    "efficientvim_m1": (32, {}, ATTN),
    "shvit_s1": (32, {}, ATTN),
    "twins_svt_small": (32, {}, ATTN),
    "crossvit_tiny_240": (32, {}, ATTN),
    "davit_tiny": (32, {}, ATTN),
    "lowformer_b0": (32, {}, ATTN),
    "hieradet_small": (32, {}, ATTN),
    "cpubone_b3": (32, {}, ATTN),
    "iformer_t": (32, {}, ATTN),
    "tnt_s_patch16_224": (224, {}, ATTN),  # Unfold + pixel/patch attention
    "volo_d1_224": (224, {}, ATTN),  # outlook attention: Unfold, softmax, Fold
}
# a broad, representative list of timm families (smallest configs), beyond tests/test_zoo_timm.py
MODELS = [
    # ResNet family
    "resnet10t", "resnet26d", "resnetrs50", "resnext26ts", "seresnext26d_32x4d", "skresnet18",
    "res2net50_14w_8s", "res2next50", "resnest14d", "ecaresnet26t", "resnetaa50", "resnetblur50",
    "wide_resnet50_2", "gcresnet33ts", "bat_resnext26ts", "tresnet_m", "resnetv2_50x1_bit",
    # RegNet
    "regnetx_002", "regnety_002", "regnetz_b16", "regnetv_040",
    # EfficientNet-style (incl. TF 'same' padding)
    "efficientnet_b0", "efficientnetv2_rw_t", "tf_efficientnet_b0", "tf_efficientnetv2_b0",
    "mobilenetv2_050", "mobilenetv3_small_050", "tf_mobilenetv3_small_100",
    "mobilenetv4_conv_small", "mobilenetv1_100", "mnasnet_050", "ghostnet_050", "ghostnetv2_100",
    "rexnet_100", "mixnet_s", "tf_mixnet_s", "hardcorenas_a", "fbnetc_100", "fbnetv3_b",
    "lcnet_050", "tinynet_e", "repghostnet_050",
    # other CNNs
    "densenet121", "densenetblur121d", "dla34", "dla46_c", "dpn48b", "hrnet_w18_small",
    "inception_v3", "inception_v4", "inception_resnet_v2", "xception41", "legacy_xception",
    "cspresnet50", "cspdarknet53", "cs3darknet_s", "darknet17", "vgg11", "vgg11_bn",
    "repvgg_a0", "mobileone_s0", "repvit_m0_9", "selecsls42b", "vovnet39a", "ese_vovnet19b_dw",
    "gernet_s", "hgnet_tiny", "hgnetv2_b0", "nf_resnet26", "nfnet_l0", "dm_nfnet_f0",
    "nf_regnet_b0", "eca_nfnet_l0", "convnext_atto", "convnextv2_atto", "inception_next_tiny",
    "rdnet_tiny", "starnet_s1", "convmixer_768_32", "mambaout_femto", "fastvit_t8",
    # MetaFormer
    "poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18",
    # MLPs
    "mixer_s16_224", "resmlp_12_224",
    # attention
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "beit_base_patch16_224", "eva02_tiny_patch14_224", "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256", "levit_128s", "mobilevit_xxs", "mobilevitv2_050",
    "coatnet_nano_rw_224", "maxvit_nano_rw_256", "efficientformer_l1", "efficientformerv2_s0",
    "edgenext_xx_small", "pit_ti_224", "tiny_vit_5m_224", "pvt_v2_b0", "botnet26t_256",
    "halonet26t", "efficientvit_m0", "xcit_nano_12_p16_224", "cait_xxs24_224",
    # added at stop 21: more timm families
    "legacy_seresnet18", "fasternet_t0", "lcnetv2_base", "cspnext_s", "swiftformer_xs",
    "focalnet_tiny_srf", "visformer_tiny", "csatv2", "gcvit_xxtiny", "nextvit_small",
    "efficientvim_m1", "shvit_s1", "twins_svt_small", "crossvit_tiny_240", "davit_tiny",
    "lowformer_b0", "hieradet_small", "cpubone_b3", "iformer_t", "tnt_s_patch16_224",
    "volo_d1_224",
]  # fmt: skip
LRP0_TOLERANCE = 1e-8
OTSUKI_TOLERANCE = 1e-4


def spec(name: str) -> tuple[int, dict[str, Any], bool]:
    return SPECS.get(name, (32, {}, False))


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:400]}"


def run_one(name: str) -> dict[str, Any]:
    import timm
    import torch
    from zoo_checks import INPUT_BOUNDS, make_input, randomize_statistics

    import lrp

    LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    size, kwargs, has_attention = spec(name)
    row: dict[str, Any] = {"model": name, "px": size, "attention": has_attention}
    t0 = time.perf_counter()

    def build(dtype: torch.dtype, shift: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        model = randomize_statistics(model, shift=shift).eval()
        with torch.no_grad():  # zero-initialised heads (timm ViTs, Mixers): logits would be 0
            for m in model.modules():
                if isinstance(m, LAYERS) and not m.weight.any():
                    torch.nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
        if not shift:
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, LAYERS) and m.bias is not None:
                        m.bias.zero_()
        return model.to(dtype).requires_grad_(False)

    try:
        model = build(torch.float32, True)
        x = make_input(2, size, torch.float32)
        with torch.no_grad():
            reference = model(x)
    except Exception as err:
        row["build"] = first_line(err)
        return row
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    composites: dict[str, str] = {}
    gaps = []
    for composite in lrp.composites.names():
        opts = {"input_bounds": INPUT_BOUNDS} if composite == "epsilon-gamma-box" else {}
        try:
            e = lrp.Explainer(model, composite, **opts)(x)
        except Exception as err:
            composites[composite] = first_line(err)
            continue
        gap = ((e.logits - reference).abs().max() / reference.abs().max()).item()
        gaps.append(gap)
        bad = []
        if not torch.isfinite(e.relevance).all():
            bad.append("not finite")
        elif not (e.relevance.flatten(1).abs().sum(1) > 0).all():
            bad.append("all zero")
        if not gap < 1e-4:
            bad.append(f"logit gap {gap:.2g}")
        composites[composite] = "ok" if not bad else "; ".join(bad)
    row["composites"] = composites
    row["logit_gap"] = max(gaps) if gaps else None
    try:
        e = lrp.Explainer(model, "otsuki2024")(x)
        row["otsuki"] = max(lrp.conservation(e).tolist())
    except Exception as err:
        row["otsuki"] = first_line(err)
    del model
    gc.collect()
    try:
        model = build(torch.float64, False)
        x64 = make_input(2, size, torch.float64)
        with torch.no_grad():
            reference = model(x64)
        e = lrp.Explainer(model, "lrp-0", zero_bias=True, stabilizer=0.0, attention="cp")(x64)
        absorbed = e.absorbed if e.absorbed is not None else torch.zeros_like(e.initial)
        total = e.relevance.flatten(1).sum(1) + absorbed
        error = ((total - e.initial).abs() / e.initial.abs()).max().item()
        row["lrp0"] = error
        row["lrp0_logit_gap"] = ((e.logits - reference).abs().max() / reference.abs().max()).item()
        row["lrp0_spread"] = (e.relevance.abs().flatten(1).sum(1) / e.initial.abs()).max().item()
    except Exception as err:
        row["lrp0"] = first_line(err)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def verdict(row: dict[str, Any]) -> str:
    if "build" in row:
        return "build fails"
    failed = [c for c, v in row.get("composites", {}).items() if v != "ok"]
    problems = []
    if failed:
        problems.append(f"{len(failed)} composites fail")
    if not isinstance(row.get("lrp0"), float) or not row["lrp0"] < LRP0_TOLERANCE:
        problems.append("lrp-0")
    otsuki = row.get("otsuki")
    if not row.get("attention") and (not isinstance(otsuki, float) or not otsuki < OTSUKI_TOLERANCE):
        problems.append("otsuki")
    return "ok" if not problems else ", ".join(problems)


def fmt(v: Any) -> str:
    return f"{v:.1e}" if isinstance(v, float) else str(v)


def _short(message: str) -> str:
    """An error's first line without the site-packages prefix of its source paths."""
    return re.sub(r"/\S*?site-packages/", "", message).replace("|", "\\|")


def _errors(row: dict[str, Any]) -> dict[str, list[str]]:
    """Distinct error messages of a row -> the checks that raised them."""
    seen: dict[str, list[str]] = {}
    for key, v in [("build", row.get("build")), ("lrp-0 f64", row.get("lrp0")),
                   ("otsuki2024 f32", row.get("otsuki")), *row.get("composites", {}).items()]:
        if isinstance(v, str) and v != "ok":
            seen.setdefault(_short(v), []).append(key)
    return seen


def markdown(rows: list[dict[str, Any]], before: list[dict[str, Any]] | None = None) -> str:
    """The per-model table (and a ``before`` column: another run's result per model), then the
    errors of the models that still fail and, with ``before``, what failed there."""
    old = {r["model"]: r for r in before or []}
    lines = [
        "| model | px | params (M) |" + (" before |" if before else "")
        + " composites ok | logit gap | lrp-0 f64 | otsuki2024 f32 | s | result |",
        "|---|---|---|" + ("---|" if before else "") + "---|---|---|---|---|---|",
    ]
    for r in rows:
        comps = r.get("composites", {})
        ok = sum(v == "ok" for v in comps.values())
        was = f" {verdict(old[r['model']]) if r['model'] in old else '-'} |" if before else ""
        lines.append(
            f"| {r['model']}{' (attn)' if r.get('attention') else ''} | {r.get('px')} | "
            f"{r.get('params_m', '')} |{was} {ok}/{len(comps)} | {fmt(r.get('logit_gap'))} | "
            f"{fmt(r.get('lrp0', ''))} | {fmt(r.get('otsuki', ''))} | {r.get('seconds', '')} | "
            f"{verdict(r)} |"
        )
    failing = [(r["model"], _errors(r)) for r in rows if _errors(r)]
    if failing:
        lines.append("\nErrors (first line):\n")
        for model, errs in failing:
            for msg, keys in errs.items():
                lines.append(f"- {model} ({', '.join(keys)}): {msg}")
    if before:
        lines.append("\nBefore (first error of each model that failed then):\n")
        for r in before:
            errs = _errors(r)
            if errs:
                msg, keys = next(iter(errs.items()))
                lines.append(f"- {r['model']} ({len(keys)} checks): {msg}")
            elif verdict(r) != "ok":
                lines.append(f"- {r['model']}: {verdict(r)} (lrp-0 f64 {fmt(r.get('lrp0'))}, "
                             f"otsuki2024 f32 {fmt(r.get('otsuki'))})")
    return "\n".join(lines)


def _read(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=MODELS)
    parser.add_argument("--one", help="run one model in this process, print its JSON row")
    parser.add_argument("--jsonl", help="append each model's row to this file")
    parser.add_argument("--markdown", action="store_true", help="print the table at the end")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", help="print the table of this --jsonl file (runs nothing)")
    parser.add_argument("--before", help="with --table: another run's --jsonl, a column")
    args = parser.parse_args()
    if args.table:
        print(markdown(_read(args.table), _read(args.before) if args.before else None))
        return
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print("ROW " + json.dumps(run_one(args.one)), flush=True)
        return
    rows = []
    for name in args.names:
        cmd = [sys.executable, __file__, "--one", name, "--threads", str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        t = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env=env)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")), None)
            if line is None:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"model": name, "build": f"process exited {done.returncode}: {tail[:300]}"}
            else:
                row = json.loads(line[4:])
        except subprocess.TimeoutExpired:
            row = {"model": name, "build": f"timeout after {args.timeout:.0f} s"}
        rows.append(row)
        print(f"{name}: {verdict(row)} ({time.perf_counter() - t:.0f} s)", file=sys.stderr,
              flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
