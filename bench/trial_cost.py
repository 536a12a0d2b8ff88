"""The cost of one trial of the shipped ImageNet study, phase by phase, and what a study costs.

One trial of ``trainers/imagenet256_xl.yaml`` at its real shapes (XL/2, 32x32x4 latents, 256 px
images), scaled down in counts only: a few fine-tune steps, a few samples, random weights and
random latents (speed does not depend on the values). Each phase is timed and set against its
FLOPs (counted: the model's by ppsearch.flops, the VAE decoder's and Inception's by PyTorch's
FlopCounterMode):

- train: PPF-3 fine-tune steps (batch, bf16, packed as the trainer says);
- sample: the evaluation's ODE solve (Heun, its steps), before (float32, eager: what trials did
  before issue 10) and after (the trainer's eval settings: bf16, CUDA graphs; on a CPU they
  do not apply, so both rows measure the same thing there);
- decode: the SD-VAE decoder (diffusers' AutoencoderKL, sd-vae-ft-ema's config);
- features: Inception-v3 FID features (torch-fidelity's, weights random).

The reference rate is a plain stack of matrix products of the model's own shapes (tokens x
width x 4 width and back, bf16 on CUDA, float32 elsewhere): each phase's efficiency is its FLOP
rate over that rate. The projection scales each phase's measured rate to the trial's full
counts (2,000 steps of 128; 10,000 samples of 50 Heun steps) and to a 60-trial study.

    python bench/trial_cost.py --device cuda          # an H100: about 3 minutes
    python bench/trial_cost.py                        # CPU figures (2 cores: about 5 minutes)
    python bench/trial_cost.py --quick                # CI: checks the script (S/2, tiny counts)
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ppsearch.config import load_trainer
from ppsearch.flops import sample_cost, train_step_macs
from ppsearch.flow import SolverConfig, fixed_noise, sample, train_step
from ppsearch.models import build_named, ppflow_variant
from ppsearch.schedule import Schedule

PPF3 = Schedule.parse("4x4@0.5,2x4@0.75,2x2")
STUDY_TRIALS = 60
TARGET_EFFICIENCY, TARGET_GPU_HOURS = 0.7, 0.7


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device, repeats: int) -> float:
    """Seconds per call, after one warm-up call."""
    function()
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - began) / repeats


def flops_of(function) -> float:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def matmul_rate(width: int, tokens: int, dtype, device, repeats: int) -> float:
    """FLOP/s of a plain stack of the model's matrix products (no attention, no norms)."""
    x = torch.randn(tokens, width, device=device, dtype=dtype)
    up = torch.randn(width, 4 * width, device=device, dtype=dtype) / math.sqrt(width)
    down = torch.randn(4 * width, width, device=device, dtype=dtype) / math.sqrt(4 * width)
    seconds = timed(lambda: ((x @ up) @ down), device, repeats)
    return 2 * 2 * tokens * width * 4 * width / seconds


def vae_decoder(device, dtype):
    """An AutoencoderKL of sd-vae-ft-ema's shape, random weights; None without diffusers."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return None
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=256)
    return vae.to(device=device, dtype=dtype).eval()


def inception(device):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=_random_inception_weights())
    return extractor.to(device).eval()


def _random_inception_weights() -> str:
    import tempfile

    from torchvision.models.inception import Inception3

    path = tempfile.NamedTemporaryFile(suffix=".pth", delete=False).name
    torch.save(Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict(), path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="SiT-XL/2")
    parser.add_argument("--train-batch", type=int, default=None, help="default: the trainer's (CPU: 2)")
    parser.add_argument("--samples", type=int, default=None, help="samples per solve (default: 64 CUDA, 2 CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    trainer = load_trainer("imagenet256_xl")
    cuda = device.type == "cuda"
    if args.quick:
        args.model, args.repeats = "S/2", 1
    train_batch = args.train_batch or (trainer.batch_size if cuda else 2)
    samples = args.samples or (64 if cuda else 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    base = build_named(args.model, num_classes=1000).to(device)
    model = ppflow_variant(base, PPF3.patch_shapes).to(device)
    config = model.config
    rate = matmul_rate(config.hidden_size, config.num_tokens(config.base_patch) * (train_batch if cuda else 1),
                       dtype, device, args.repeats)
    rows = []

    # -- train: PPF-3 fine-tune steps ------------------------------------------------------------
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    x1 = torch.randn(train_batch, config.in_channels, *config.input_size, device=device)
    y = torch.randint(0, 1000, (train_batch,), device=device)
    step = lambda: train_step(model, optimizer, x1, y, PPF3, packed=trainer.packed and cuda,  # noqa: E731
                              bf16=trainer.bf16 and cuda, grad_clip=trainer.grad_clip)
    seconds = timed(step, device, args.repeats)
    flops = 2 * train_step_macs(config, PPF3, train_batch)
    rows.append(("train", f"{train_batch} per step", seconds, flops, flops / seconds,
                 2 * train_step_macs(config, PPF3, trainer.batch_size) * trainer.steps))

    # -- sample: the evaluation's solve, before and after ----------------------------------------
    steps = 4 if args.quick else trainer.eval.steps
    noise = fixed_noise(samples, (config.in_channels, *config.input_size), 0, device)
    labels = torch.randint(0, 1000, (samples,), device=device)
    full_flops = None
    for label, solver in [("sample, before (fp32, eager)", SolverConfig(steps=steps, solver=trainer.eval.solver,
                                                                          guidance=trainer.eval.guidance)),
                          ("sample, after (eval settings)", SolverConfig(
                              steps=steps, solver=trainer.eval.solver, guidance=trainer.eval.guidance,
                              bf16=trainer.eval.bf16 and cuda, cuda_graphs=trainer.eval.cuda_graphs and cuda,
                              compile=trainer.eval.compile))]:
        seconds = timed(lambda: sample(model, PPF3, noise, labels, solver), device, args.repeats)
        flops = 2 * sample_cost(config, PPF3, solver).macs * samples
        full = SolverConfig(steps=trainer.eval.steps, solver=trainer.eval.solver, guidance=trainer.eval.guidance)
        full_flops = 2 * sample_cost(config, PPF3, full).macs * trainer.eval.num_samples
        rows.append((label, f"{samples} x {steps} steps", seconds, flops, flops / seconds, full_flops))

    # -- decode and features ---------------------------------------------------------------------
    vae = None if args.quick else vae_decoder(device, dtype)
    if vae is not None:
        z = torch.randn(samples, 4, 32, 32, device=device, dtype=dtype)
        with torch.no_grad():
            decode = lambda: vae.decode(z).sample  # noqa: E731
            seconds = timed(decode, device, args.repeats)
            flops = flops_of(decode)
        rows.append(("decode (SD-VAE)", f"{samples} images", seconds, flops, flops / seconds,
                     flops / samples * trainer.eval.num_samples))
    extractor = inception(device)
    images = torch.randint(0, 256, (samples, 3, 256, 256), dtype=torch.uint8, device=device)
    with torch.no_grad():
        extract = lambda: extractor(images)  # noqa: E731
        seconds = timed(extract, device, args.repeats)
        flops = flops_of(extract)
    rows.append(("features (Inception)", f"{samples} images", seconds, flops, flops / seconds,
                 flops / samples * trainer.eval.num_samples))

    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}, model {args.model}, dtype {dtype}; plain-stack matmul rate {rate / 1e12:.2f} TFLOP/s")
    print(f"{'phase':<30} {'measured on':>16} {'s':>9} {'TFLOP':>9} {'TFLOP/s':>8} {'eff':>5} {'full trial h':>12}")
    hours = {}
    for phase, what, seconds, flops, achieved, full in rows:
        hours[phase] = full / achieved / 3600
        print(f"{phase:<30} {what:>16} {seconds:>9.3f} {flops / 1e12:>9.3f} {achieved / 1e12:>8.2f} "
              f"{achieved / rate:>5.2f} {hours[phase]:>12.3f}")
    common = sum(h for p, h in hours.items() if not p.startswith("sample"))
    before, after = (common + hours[p] for p in ("sample, before (fp32, eager)", "sample, after (eval settings)"))
    worst = min(r[4] / rate for r in rows if not r[0].startswith("sample, before"))
    print(f"projected trial ({trainer.steps} steps of {trainer.batch_size}, {trainer.eval.num_samples} samples x "
          f"{trainer.eval.steps} {trainer.eval.solver} steps): before {before:.2f} h, after {after:.2f} h per "
          f"device; a {STUDY_TRIALS}-trial study {STUDY_TRIALS * before:.0f} -> {STUDY_TRIALS * after:.0f} device-hours")
    verdict = ("met" if worst >= TARGET_EFFICIENCY and after <= TARGET_GPU_HOURS else "MISSED") if cuda else \
        "not judged (targets are for an H100)"
    print(f"result: trial {after:.2f} device-hours after ({before:.2f} before), worst phase efficiency "
          f"{worst:.2f}; targets >= {TARGET_EFFICIENCY} and <= {TARGET_GPU_HOURS} h: {verdict}")


if __name__ == "__main__":
    main()
