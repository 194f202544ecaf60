"""Train the first stage of a latent model (an LDM AutoencoderKL) on frames of the shapes world.

    python tools/train_vae.py --threads 2

The diffusion stage (tools/train.py) runs this first when the config's VAE is an
``autoencoder_kl``. Frames are rendered at the config's frame size and averaged over
``model.vae.upscale`` blocks, as the model sees them; the loss is MSE + L1 reconstruction of
a posterior sample plus a small KL term that keeps the latents smooth. Resumable from
``--vae-state``; the frames of step k are a pure function of ``--seed`` and k. It prints the
latents' standard deviation: ``model.schedule.scale_factor`` should be about its inverse.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fifo_stream import world  # noqa: E402
from fifo_stream.config import load_config  # noqa: E402
from fifo_stream.durable import atomic_write  # noqa: E402
from fifo_stream.models.loading import load_model  # noqa: E402
from fifo_stream.models.vae import build_vae, encode_frames  # noqa: E402


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae-state", default="runs/train/vae.pt", help="resumable first-stage training state")
    p.add_argument("--vae-steps", type=int, default=4500)
    p.add_argument("--vae-batch", type=int, default=32, help="frames per step")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the per-element KL term")
    p.add_argument("--open-identity", action="store_true", help="world v2: hats, and a third of the captions without the body color")


def frames(cfg, step: int, args) -> torch.Tensor:
    """The training frames of step ``step`` (vae_batch, 3, H/upscale, W/upscale) in [-1, 1]: pairs from random clips."""
    f, size = cfg.model.unet.temporal_length, cfg.video.height
    rng = np.random.default_rng([args.seed, 1, step])
    out = []
    for _ in range(args.vae_batch // 2):  # frame 0 and a later frame of a training clip (train.batch's scenes)
        scene = world.random_scene(size, int(rng.integers(2**62)), open_identity=args.open_identity)
        out += [world.render(scene, size, 1)[0], world.render(scene, size, 1, start=int(rng.integers(1, f)))[0]]
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return F.avg_pool2d(x, cfg.model.vae.upscale)


def init_weights(cfg, path: str):
    """The exported model at ``path`` (fp32, on the CPU), to fine-tune from."""
    return load_model(OmegaConf.merge(cfg, {"runtime": {"device": "cpu", "dtype": "fp32"}}), path)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    """One step at learning rate ``lr``, gradients clipped to norm 1."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], 1.0)
    opt.step()


def lr_at(step: int, args) -> float:
    warm = min(1.0, (step + 1) / 50)
    return args.vae_lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps)))


def train_vae(cfg, args, device: torch.device, init: torch.nn.Module | None = None):
    """The trained (or resumed, once finished) first stage, frozen, in eval mode; ``init`` is a VAE to fine-tune."""
    torch.manual_seed(args.seed)
    vae = build_vae(OmegaConf.to_container(cfg.model.vae))
    if init is not None:
        vae.load_state_dict(init.state_dict())
    vae = vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    path, step = Path(args.vae_state), 0
    if path.exists():
        st = torch.load(path, map_location=device, weights_only=True)
        vae.load_state_dict(st["vae"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        print(f"resumed the VAE from {path} at step {step}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    smooth, t0 = None, time.time()
    while step < args.vae_steps:
        torch.manual_seed(args.seed * 1_000_037 + step)  # the posterior sample: a function of the step, so resuming changes nothing
        x = frames(cfg, step, args).to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample()
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = mse + (rec - x).abs().mean() + args.vae_kl * posterior.kl().mean() / z[0].numel()
        optimizer_step(opt, loss, lr_at(step, args))
        step += 1
        smooth = mse.item() if smooth is None else 0.98 * smooth + 0.02 * mse.item()
        if step % 50 == 0 or step == args.vae_steps:
            rec_log = {"vae_step": step, "mse": round(smooth, 5), "lr": lr_at(step - 1, args), "elapsed_s": round(time.time() - t0, 1)}
            print(json.dumps(rec_log), flush=True)
        if step % 250 == 0 or step == args.vae_steps:
            buf = io.BytesIO()
            torch.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}, buf)
            atomic_write(path, buf.getvalue())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = encode_frames(vae, frames(cfg, 10**9, args).to(device), scale_factor=1.0)
    print(f"VAE: {step} steps, latent std {z.std().item():.4f} (scale_factor ~ {1 / z.std().item():.4f})", flush=True)
    return vae


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--init", default=None, help="fine-tune the VAE of these exported weights (a .safetensors)")
    add_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    train_vae(cfg, args, torch.device("cuda" if torch.cuda.is_available() else "cpu"), init_weights(cfg, args.init).vae if args.init else None)


if __name__ == "__main__":
    main()
