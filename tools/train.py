"""Train the embedded model (configs/tiny.yaml) on the procedural shapes world.

    python tools/train.py --threads 2 --out fifo_stream/assets/tiny-shapes.safetensors

eps prediction on the model's (VideoCrafter) noise schedule, classifier-free guidance
dropout, AdamW with warm-up and cosine decay, and an EMA of the weights (the EMA is
what gets exported). Half of the batches use one timestep per clip (as in plain DDIM);
the other half use per-frame timesteps from the FIFO ladder the sampler uses, so the
model sees the staggered noise levels of FIFO windows during training; three quarters of the
one-timestep batches use the sampler's levels too (``--focus``). Half of the steps spend their
frames on short clips of more scenes (``--short-fraction``, ``--short-frames``). The training noise has
low-frequency parts (``--offset-noise``, ``--coarse-noise``; see :func:`training_noise`). The loss may
weigh latent cells an object covers more (``--object-weight``) and noisy frames more
(``--v-weight-cap``, see :func:`noise_level_weight`). A latent model's
first stage (an ``autoencoder_kl`` VAE) is trained first by tools/train_vae.py, then frozen.

Resumable: a training state is written atomically every ``--save-every`` steps to
``--state`` and picked up automatically; the loss is logged to stdout and ``--log``
(JSON lines). The clips of step k are a pure function of ``--seed`` and k.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_vae import add_args as add_vae_args  # noqa: E402
from train_vae import init_weights, optimizer_step, train_vae  # noqa: E402

from fifo_stream import world  # noqa: E402
from fifo_stream.models.checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, save_safetensors  # noqa: E402
from fifo_stream.config import load_config  # noqa: E402
from fifo_stream.durable import atomic_write  # noqa: E402
from fifo_stream.models.loading import TOKENIZER_KEY, VOCAB_KEY  # noqa: E402
from fifo_stream.sampling.schedule import alphas_cumprod, fifo_timesteps  # noqa: E402
from fifo_stream.models.text_encoder import OpenCLIPTextTower, TextEncoder  # noqa: E402
from fifo_stream.models.tokenizer import WordTokenizer  # noqa: E402
from fifo_stream.models.unet import UNet3D  # noqa: E402
from fifo_stream.models.vae import PixelShuffleCodec, build_vae, encode_frames, ldm_vae_state_dict  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--out", default="fifo_stream/assets/tiny-shapes.safetensors")
    p.add_argument("--state", default="runs/train/state.pt", help="resumable training state")
    p.add_argument("--log", default="runs/train/log.jsonl")
    p.add_argument("--steps", type=int, default=10400)
    p.add_argument("--batch", type=int, default=4, help="clips of the model's full length per step")
    p.add_argument("--short-frames", type=int, default=1, help="frames per clip in short-clip steps (1: image steps, as VideoCrafter2 trains jointly on images)")
    p.add_argument("--short-fraction", type=float, default=0.5, help="fraction of steps on short clips (same frames per step, more scenes)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of training on the empty prompt")
    p.add_argument("--fifo-fraction", type=float, default=0.5, help="fraction of batches with FIFO per-frame timesteps")
    p.add_argument("--focus", type=float, default=0.75, help="fraction of one-timestep batches drawn from the sampler's FIFO levels")
    p.add_argument("--object-weight", type=float, default=1.0, help="loss weight of latent cells covered by an object (1: unweighted)")
    p.add_argument("--hat-weight", type=float, default=None, help="loss weight of latent cells covered by a hat (default: --object-weight)")
    p.add_argument("--v-weight-cap", type=float, default=1.0, help="weight each frame's eps loss by min(1 / alpha_bar_t, CAP), v-prediction's weighting capped (1: the plain eps loss)")
    p.add_argument("--offset-noise", type=float, default=0.3, help="weight of a per-clip constant, one per color (pixel_shuffle) or latent channel, added to the noise")
    p.add_argument("--coarse-noise", type=float, default=0.2, help="weight of a per-clip 4x4 noise field, upsampled, added to the noise")
    p.add_argument("--train-only", default=None, metavar="REGEX", help="fine-tune: train only the parameters whose names (unet.*, text.*) match this regex; the rest stay frozen")
    p.add_argument("--init", default=None, help="fine-tune: start the U-Net, text encoder and VAE from these exported weights (a .safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_vae_args(p)
    return p.parse_args(argv)


def build(cfg) -> tuple[UNet3D, TextEncoder]:
    text_cfg = OmegaConf.to_container(cfg.model.text_encoder)
    text_cfg.pop("tokenizer")
    tower = OpenCLIPTextTower(**text_cfg)
    tokenizer = WordTokenizer(world.VOCAB, tower.context_length)
    if len(tokenizer) != tower.token_embedding.num_embeddings:
        raise SystemExit(f"config text_encoder.vocab_size must be {len(tokenizer)} for the world's vocabulary")
    return UNet3D(**OmegaConf.to_container(cfg.model.unet)), TextEncoder(tower, tokenizer)


def zero_init(unet: UNet3D) -> None:
    """Zero the last layer of every residual branch and the output, as upstream initialises.

    Each block then starts as the identity, which makes a freshly built U-Net train fast.
    """
    from fifo_stream.models.unet_blocks import ResBlock, TemporalConvBlock

    last = [unet.out[-1]]
    for name, module in unet.named_modules():
        if isinstance(module, ResBlock):
            last.append(module.out_layers[-1])
        elif isinstance(module, TemporalConvBlock):
            last.append(module.conv4[-1])
        elif name.endswith("proj_out"):
            last.append(module)
    for layer in last:
        torch.nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            torch.nn.init.zeros_(layer.bias)


def clip_shape(cfg, step: int, args) -> tuple[int, int]:
    """(clips, frames per clip) of training step ``step``.

    A clip's frames differ by a pixel or two, so a full-length clip teaches the spatial layers
    (what a red square looks like) little more than a short one, at several times the cost. Short-clip
    steps spend the same frames on more scenes; full-length steps keep teaching the temporal layers
    the model's whole window.
    """
    f = cfg.model.unet.temporal_length
    g = torch.Generator().manual_seed(args.seed * 1_000_033 + step)
    if torch.rand((), generator=g) < args.short_fraction:
        return args.batch * f // args.short_frames, args.short_frames
    return args.batch, f


def batch(cfg, codec, step: int, args, device) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Clean latents (B, c, f, h, w), captions and loss weights (B, 1, f, h, w) of training step ``step``.

    A latent cell's weight is 1 plus ``--object-weight - 1`` times the fraction of its pixels that
    show an object (an unweighted loss is mostly background), plus ``--hat-weight - --object-weight``
    times the fraction that show a hat: the hat is a few latent cells that no caption names.
    """
    size = cfg.video.height
    count, f = clip_shape(cfg, step, args)
    clips, masks, hats, captions = [], [], [], []
    rng = np.random.default_rng([args.seed, step])
    for i in range(count):
        scene = world.random_scene(size, int(rng.integers(2**62)), open_identity=args.open_identity)
        clips.append(world.render(scene, size, f))
        masks.append(world.object_mask(scene, size, f))
        hats.append(world.object_mask(scene, size, f, hats=True))
        captions.append("" if rng.random() < args.cfg_dropout else scene.caption)
    pixels = torch.from_numpy(np.stack(clips)).to(device).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0  # b t 3 H W
    b, t = pixels.shape[:2]
    z = encode_frames(codec, pixels.flatten(0, 1), cfg.model.schedule.scale_factor, cfg.model.vae.upscale)
    cover, hat_cover = (F.adaptive_avg_pool2d(torch.from_numpy(np.stack(m)).to(device).float(), z.shape[-2:]) for m in (masks, hats))  # b t h w
    hat_weight = args.object_weight if args.hat_weight is None else args.hat_weight
    weights = 1 + (args.object_weight - 1) * cover + (hat_weight - args.object_weight) * hat_cover
    return z.unflatten(0, (b, t)).transpose(1, 2), captions, weights[:, None]


def timesteps(cfg, step: int, args, b: int, f: int, device) -> torch.Tensor:
    """(b, f) timesteps: one per clip, or a window of the FIFO ladder (with its lookahead head).

    With ``--focus`` the one-per-clip timesteps come from the ladder's levels that often: the
    default sampler only ever evaluates those, so the model's capacity goes where it is used.
    """
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    n = cfg.model.schedule.num_train_timesteps
    ladder = fifo_timesteps(cfg.model.unet.temporal_length * cfg.sampling.partitions, n)
    if torch.rand((), generator=g) >= args.fifo_fraction:
        if torch.rand((), generator=g) < args.focus:
            return ladder[torch.randint(0, len(ladder), (b, 1), generator=g)].expand(b, f).to(device)
        return torch.randint(0, n, (b, 1), generator=g).expand(b, f).to(device)
    start = torch.randint(-f // 2, len(ladder) - f + 1, (b, 1), generator=g)
    return ladder[(start + torch.arange(f)).clamp(min=0)].to(device)


def training_noise(shape, args, g: torch.Generator, device, shared: int = 1) -> torch.Tensor:
    """Training noise: unit white noise, plus optional low-frequency parts shared by a clip's frames.

    The VideoCrafter schedule keeps sqrt(alpha_999) = 0.07 of the signal at its noisiest step. In
    pixel space a frame's mean color survives that (averaged over 32x32 pixels it stands far above
    the noise), so a model trained on white noise reads the background and colors off the noise it
    is sampled from and ignores the prompt. A per-clip constant (offset noise) and a coarse field
    of the same size hide what is that coarse, so the prompt has to decide it.

    The low-frequency parts are added on top and the sum is not rescaled: the sampler injects unit
    white noise, and a model trained on white noise of a smaller variance leaves the difference,
    amplified by 1 / sqrt(alpha), in every pixel of its samples. Each run of ``shared`` neighbouring
    channels gets the same low-frequency parts (the pixel_shuffle codec stores an RGB channel's
    sub-pixels next to each other, and they are one color).
    """
    b, c, f, h, w = shape
    eps = torch.randn(shape, generator=g, device=device)
    groups = c // shared
    if args.offset_noise:
        offset = torch.randn((b, groups, 1, 1, 1), generator=g, device=device)
        eps = eps + args.offset_noise * offset.repeat_interleave(shared, 1)
    if args.coarse_noise:
        field = F.interpolate(torch.randn((b, groups, 4, 4), generator=g, device=device), size=(h, w), mode="bilinear", align_corners=False)
        field = field / field.pow(2).mean(dim=(2, 3), keepdim=True).sqrt()  # unit mean square
        eps = eps + args.coarse_noise * field.repeat_interleave(shared, 1)[:, :, None]
    return eps


def noise_level_weight(alpha_bar: torch.Tensor, cap: float) -> torch.Tensor:
    """Loss weight of frames at noise level ``alpha_bar``: min(1 / alpha_bar, cap).

    The eps loss weighs a frame's x0 error by its SNR, so at high noise, where a clip's frames
    decide together what the prompt leaves open (a body color, a hat), it barely sees whether
    they agree. 1 / alpha_bar = 1 + 1 / SNR is the weight that makes it v-prediction's loss;
    the cap keeps the noisiest levels (1 / alpha_bar up to 215) from drowning the rest.
    """
    return alpha_bar.reciprocal().clamp(max=cap)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def export(path: Path, ema: dict, codec, cfg, step: int, loss: float) -> None:
    state = {UNET_PREFIX + k[len("unet."):]: v for k, v in ema.items() if k.startswith("unet.")}
    state.update({TEXT_PREFIX + k[len("text.tower."):]: v for k, v in ema.items() if k.startswith("text.tower.")})
    if not isinstance(codec, PixelShuffleCodec):
        state.update({VAE_PREFIX + k: v for k, v in ldm_vae_state_dict(codec).items()})
    meta = {
        TOKENIZER_KEY: "words",
        VOCAB_KEY: json.dumps(list(world.VOCAB)),
        "fifo_stream.config": cfg.model.name,
        "fifo_stream.steps": str(step),
        "fifo_stream.ema_loss": f"{loss:.5f}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, path, torch.float16, meta)


def trainable(model: torch.nn.Module, pattern: str | None) -> list[torch.nn.Parameter]:
    """The parameters whose names match ``pattern`` (all when None); the others are frozen."""
    try:
        wanted = re.compile(pattern or "")
    except re.error as e:
        raise SystemExit(f"--train-only {pattern!r} is not a regular expression ({e})") from None
    trained = [p for name, p in model.named_parameters() if wanted.search(name)]
    if not trained:
        raise SystemExit(f"--train-only {pattern!r} matches no parameter; names look like {next(model.named_parameters())[0]}")
    for p in set(model.parameters()) - set(trained):
        p.requires_grad_(False)
    return trained


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cfg = load_config(args.config)
    if not 1 <= args.short_frames <= cfg.model.unet.temporal_length:
        raise SystemExit(f"--short-frames must be between 1 and the model's {cfg.model.unet.temporal_length} frames (it is {args.short_frames})")
    torch.manual_seed(args.seed)
    unet, text = build(cfg)
    zero_init(unet)
    init = init_weights(cfg, args.init) if args.init else None
    if init:
        unet.load_state_dict(init.unet.state_dict())
        text.tower.load_state_dict(init.text_encoder.tower.state_dict())
    model = torch.nn.ModuleDict({"unet": unet, "text": text}).to(device).train()
    trained = trainable(model, args.train_only)  # checked before the first stage trains or writes anything
    state_path, log_path = Path(args.state), Path(args.log)
    st = torch.load(state_path, map_location=device, weights_only=True) if state_path.exists() else None
    if st is not None and st.get("train_only") != args.train_only:
        raise SystemExit(f"{state_path} was trained with --train-only {st.get('train_only')!r}, not {args.train_only!r}: rerun with that option, or another --state")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.model.vae.type == "autoencoder_kl":
        codec = train_vae(cfg, args, device, init.vae if init else None)
    else:
        codec = build_vae(OmegaConf.to_container(cfg.model.vae)).to(device)
    shared = codec.factor**2 if isinstance(codec, PixelShuffleCodec) else 1
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.01)
    alphas = alphas_cumprod(cfg.model.schedule.num_train_timesteps, cfg.model.schedule.linear_start, cfg.model.schedule.linear_end)
    alphas = alphas.float().to(device)

    step, smooth = 0, None
    if st is not None:
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        step, smooth = st["step"], st["smooth"]
        print(f"resumed from {state_path} at step {step}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"training {sum(p.numel() for p in trained) / 1e6:.2f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}", flush=True)

    t0 = time.time()
    while step < args.steps:
        torch.manual_seed(args.seed * 1_000_003 + step)  # dropout masks: a function of the step, so resuming changes nothing
        x0, captions, weights = batch(cfg, codec, step, args, device)
        t = timesteps(cfg, step, args, x0.shape[0], x0.shape[2], device)
        g = torch.Generator(device=device).manual_seed(args.seed * 7919 + step)
        eps = training_noise(x0.shape, args, g, device, shared)
        a = alphas[t][:, None, :, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        weights_t = weights * noise_level_weight(a, args.v_weight_cap)  # normalised by the cells' weights only: noisy steps weigh more
        loss = (weights_t * (unet(xt, t, text(captions), cfg.video.fps) - eps).pow(2)).mean() / weights.mean()
        optimizer_step(opt, loss, lr_at(step, args))
        decay = min(args.ema, (1 + step) / (10 + step))  # short memory early on, so the EMA forgets the init
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        step += 1
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 50 == 0 or step == args.steps:
            rec = {"step": step, "loss": round(loss.item(), 5), "smooth_loss": round(smooth, 5), "lr": lr_at(step - 1, args), "elapsed_s": round(time.time() - t0, 1)}
            print(json.dumps(rec), flush=True)
            with log_path.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if step % args.save_every == 0 or step == args.steps:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step, "smooth": smooth, "train_only": args.train_only}, buf)
            atomic_write(state_path, buf.getvalue())
            export(Path(args.out), ema.state_dict(), codec, cfg, step, smooth)
    print(f"done: {step} steps, smoothed loss {smooth:.4f}, weights in {args.out}", flush=True)


if __name__ == "__main__":
    main()
