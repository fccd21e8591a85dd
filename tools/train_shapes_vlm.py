#!/usr/bin/env python
"""Train the ShapesVQA testbed: a SmolVLM whose text model is the real SmolLM2-135M-Instruct.

The language model stays frozen (optionally with small LoRA adapters on its attention, merged at
assembly time); the small SigLIP-style vision tower and the pixel-shuffle connector are trained from
scratch on ShapesVQA's train split, loss on the answer tokens only (`` red<end_of_utterance>``).

Everything is seeded: the weights' initialisation (``--seed``) and the data (training step ``s`` uses
the train-split seeds ``s*batch .. s*batch+batch-1``), so a resumed run sees the same samples as an
uninterrupted one.

Output folder (``--out``)::

    base/             the untrained HF model directory (random vision, SmolLM2 text model)
    log.jsonl         one JSON object per logged step / evaluation
    last.pt           trainable weights + optimizer + step (``--resume`` continues from it)
    best.safetensors  trainable weights of the best validation checkpoint (+ best.json)

Validation accuracy here is *teacher-forced exact match*: every answer token must be the arg-max under
teacher forcing and the closing token a stop token, which is exactly "greedy decoding reproduces the
answer and stops"; it needs one batched forward pass instead of a generation loop. (SmolVLM's
``<end_of_utterance>`` embedding row is a copy of ``<|im_end|>``'s and the head is tied, so their logits
are always equal: the answer loss cannot go below ln 2 per answer on that token, and greedy decoding
stops on ``<|im_end|>``, which is also a stop token.)

On the GPU machine (one H100, 2026-11-27; its transformers 5.17, torch 2.11): ``--device cuda --workers 13 --batch 32``,
float32 with TF32 matmuls, rank-8 LoRA on attention and MLP, from the committed parts: 0.21 s/step, 1470 steps (47k
scenes) in 6 minutes; validation loss fell steadily, 0.70 / 0.67 / 0.65 / 0.64 / 0.63 / 0.62 at steps 250 / 500 / ... /
1470. The accuracy there read 0 (that transformers' GGUF tokenizer named <|im_start|> as eos, so <|im_end|> was
no stop token; fixed since in ``testbed/smollm2.py``), so only the first checkpoint (step 250) came back: 0.541 on 320
validation samples against 0.534 for the committed parts, not adopted. ``--bf16`` failed there in SmolVLM's
``inputs_merger`` (bf16 image features into float32 embeddings); the connector's output is now cast back to float32.

Measured so far (CPU, batch 8, 4 questions per scene, rank-8 attention LoRA; teacher-forced validation accuracy
on 120-160 samples): the committed parts reached 0.54 at step 450 (``--aux-weight 0.5``); ``--aux-extended``
0.56 at step 513. ``--pretrain-steps 200 --aux-scene`` gave 0.39 / 0.39 / 0.43 at steps 100 / 200 / 300, and
adding ``--aux-embed 1`` (word-embedding part of the loss down to ~0.4 after pretraining) 0.41 / 0.39 at steps
100 / 200: colour is learned, count, position and presence stay near chance at these step counts.

What limits it (CPU, 2026-11-27): the vision tower does not learn the shapes' kinds. Vision-only pretraining
(``--pretrain-steps``, batch 16, LR 1e-3, the ``--aux-extended`` probe; its accuracy per head is now logged as
``pretrain_probe`` / ``probe_val``): colour per shape cell 0.98 by step 200, the left/right and top/bottom bands
0.90 / 0.89 by step 800-1000, but kind (circle, square, triangle, star, cross) stayed at chance, 0.24-0.28 against
0.20, through step 1200 (19k images, 13 min). Trained on the centre cells' kind alone, 300 steps left its loss at 1.52
(ln 5 = 1.61). The information is in the pixels: a one-hidden-layer MLP on a centre cell's 32x32 raw pixels reaches
0.63 on held-out scenes after 300 steps of batch 256 (7.5k cells). Almost every question names a kind, which is why
colour (0.73) is the best type and count (0.30) the worst. The language-model side is slow too: with the connector's
output replaced by ideal tokens (each shape cell the scaled bag of the LM's word embeddings of its colour, kind,
count and sides, background the embedding of " ."), rank-8 LoRA on all linears at LR 1e-3 reached 0.56 / 0.63 / 0.68
at steps 50 / 100 / 150 (position 0.90, presence 0.49). ``tools/vision_kind_probe.py`` isolates the kind skill: on the same
per-cell labels a small CNN reaches 0.39 after 9.6k images (0.62 with the kind loss on shape cells only), this ViT 0.33
(0.31), and at 128 px (one patch per cell, 3.6x cheaper per step) 0.44 after 48k images: the ViT, not the labels or the
loss, is what learns slowly. Both call for GPU-scale training, vision first: the
vision-only pretraining takes ``--workers`` like the main loop, and costs ~0.04 s per image here against ~0.5 s
per scene with the LM in the loop.

The lever (2026-12-06): ``--layout grid --patch-size 32 --scale-factor 1`` puts every shape centred in its own
32-pixel cell of ShapesVQA's 8x8 grid and gives the ViT one patch per cell (still 64 image tokens, connector in
256 -> 576; the exporter takes the geometry: float ONNX = torch, image-feature cosine 1.0 on a tiny model). One token
then sees one whole shape, and the kind probe (``tools/vision_kind_probe.py --layout grid --patch-size 32``) reaches
0.975 kind accuracy at step 50 instead of 0.31-0.33 at step 300. That probe's kind loss is on shape cells only; the
trainer's needs ``--aux-kind-on-shapes`` for the same (without it, ~4 % shape cells, its pretraining probe stayed at
kind 0.25, colour 0.88 at step 60; with it kind 0.35 / 0.58 and colour 0.20 / 0.47 at steps 50 / 100, still rising;
loss 4.0 -> 0.87). The vision-only pretraining is not checkpointed: ``--resume`` before LM step 25 starts over. The
long run on it::

    nohup nice -n 19 python tools/train_shapes_vlm.py --layout grid --patch-size 32 --scale-factor 1 --lora-rank 8 \
        --aux-weight 0.5 --aux-kind-on-shapes --pretrain-steps 400 --steps 2400 --eval-every 50 --n-val 160 \
        --max-minutes 1000 --threads 2 --out /work/train_shapes/grid32 [--resume] &

(``--resume`` needs the same flags; a different ``--layout`` is refused.) A grid testbed is evaluated on grid scenes:
``meta.json``'s ``data.layout`` reaches ``testbed.json`` and every evaluation (``testbed_layout``).

``--export-assets DIR`` writes the committed parts from ``best.safetensors`` (or ``--from``):
``vision_connector.safetensors``, ``lora.safetensors`` (when LoRA was trained) and ``meta.json``.

Examples::

    python tools/train_shapes_vlm.py --bench 3                   # time a few steps and exit
    python tools/train_shapes_vlm.py --steps 900 --out /tmp/train_shapes/run
    python tools/train_shapes_vlm.py --out /tmp/train_shapes/run --resume
    python tools/train_shapes_vlm.py --out /tmp/train_shapes/run --export-assets vlmq_export/assets/shapes_smolvlm
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GEOMETRY_KEYS = ("image_size", "patch_size", "scale_factor", "vision_hidden_size", "vision_intermediate_size",
                 "vision_layers", "vision_heads")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/train_shapes/run")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--questions", type=int, default=4,
                   help="questions packed per training scene (the image block goes through the LM once for all)")
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of an auxiliary dense loss: a linear probe (dropped after training) on the connector's "
                        "image tokens predicts, per token's 32x32 cell, the colour and kind of the shape covering it")
    p.add_argument("--aux-kind-on-shapes", action="store_true",
                   help="the auxiliary probe's kind loss on the cells a shape covers only (the colour head's background "
                        "class still finds them): on the grid layout ~4 %% of the cells hold a shape, and a kind loss "
                        "over all cells leaves kind at chance (pretraining probe: colour 0.88, kind 0.25 at step 60)")
    p.add_argument("--aux-extended", action="store_true",
                   help="the auxiliary probe also predicts, per cell, whether it holds a shape's centre and the shape's "
                        "left/middle/right and top/middle/bottom band, and per image how many shapes of each kind")
    p.add_argument("--aux-scene", action="store_true",
                   help="(with --aux-extended) every cell of a shape also predicts how many shapes of its kind the scene "
                        "holds and the colours of all shapes of its kind: the answers to count and presence questions, "
                        "placed on the tokens a question about that kind retrieves")
    p.add_argument("--aux-embed", type=float, default=0.0,
                   help="weight of a loss that pulls every shape cell's image token (the connector's output) towards "
                        "the LM's own input embeddings of the words that describe the shape: its colour, kind, how many "
                        "of its kind, left/right and top/bottom (a bag of words per cell; needs --aux-weight > 0)")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="before the LM-in-the-loop training, train the vision tower + connector on the auxiliary probe "
                        "alone for this many steps (no language-model forward: much cheaper per image)")
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--data-offset", type=int, default=0, help="first train-split index (continue on fresh scenes)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the vision tower + connector")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the LM's linears (0: LM fully frozen)")
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="which of each decoder layer's linears get LoRA: q_proj,k_proj,v_proj,o_proj (attention) and "
                        "gate_proj,up_proj,down_proj (MLP)")
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward/backward (measure first)")
    p.add_argument("--text-model", default="smollm2", choices=("smollm2", "tiny"),
                   help="smollm2: the real SmolLM2-135M-Instruct (the testbed); tiny: a tiny random SmolVLM, to check "
                        "the training loop end to end in seconds (tests, a new machine)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loader processes that render and tokenize the training (and vision-only pretraining) batches "
                        "ahead (0: in the loop)")
    p.add_argument("--budget-minutes", type=float, default=0.0,
                   help="fit the LM-in-the-loop training of this invocation (a --resume too) to this much wall time: "
                        "after timing its steps 6-25, --steps is lowered so the schedule ends inside the budget (the "
                        "chosen count is logged; pass it as --steps to repeat the run exactly)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--n-val", type=int, default=160)
    p.add_argument("--ckpt-every", type=int, default=25)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop (final eval + save) after this much training time")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--init", default=None,
                   help="start from these trainable weights, new schedule: a .safetensors, a last.pt or an assets folder "
                        "(e.g. vlmq_export/assets/shapes_smolvlm); LoRA targets the weights lack start at zero")
    p.add_argument("--bench", type=int, default=0, help="time this many training steps and exit")
    p.add_argument("--export-assets", default=None, help="write the committed parts to this folder and exit")
    p.add_argument("--test-n", type=int, default=1000,
                   help="with --export-assets: evaluate the assembled testbed on this many test-split samples (greedy "
                        "exact match, 95 %% intervals) into meta.json's 'test' (0: skip)")
    p.add_argument("--measure-test", default=None, metavar="ASSETS",
                   help="evaluate the testbed assembled from an assets folder on --test-n test samples into its "
                        "meta.json's 'test' and exit (parts exported before meta.json recorded it)")
    p.add_argument("--from", dest="from_", default=None,
                   help="weights for --export-assets: OUT/best.safetensors (default) or OUT/last.pt (the last step)")
    p.add_argument("--layout", default="free", choices=("free", "grid"),
                   help="ShapesVQA's layout (vlmq_export.data.shapes): free (the committed testbed's) or grid (each shape "
                        "centred in its own cell of an 8x8 grid: with --patch-size 32 --scale-factor 1 at 256 px, one "
                        "shape per image token); recorded in meta.json")
    for k, v in (("image_size", 256), ("patch_size", 16), ("scale_factor", 2), ("vision_hidden_size", 256),
                 ("vision_intermediate_size", 1024), ("vision_layers", 4), ("vision_heads", 4)):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ LoRA
def lora_modules():
    import torch

    class LoRALinear(torch.nn.Module):
        """base(x) + (x A^T) B^T * alpha/r; merged into base.weight at assembly (W += B A * alpha/r)."""

        def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, gen: torch.Generator):
            super().__init__()
            self.base = base
            self.rank, self.alpha = rank, alpha
            self.lora_A = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features))
            self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x):
            return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * (self.alpha / self.rank)

    return LoRALinear


def add_lora(model, rank: int, targets: list[str], seed: int) -> None:
    import torch

    LoRALinear = lora_modules()
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.text_model.layers:
        for name in targets:
            owner = next((m for m in (layer.self_attn, layer.mlp) if isinstance(getattr(m, name, None), torch.nn.Linear)), None)
            if owner is None:
                raise SystemExit(f"--lora-targets: no linear {name!r} in a decoder layer's attention or MLP")
            setattr(owner, name, LoRALinear(getattr(owner, name), rank, float(rank), gen))  # alpha = rank: scale 1


def trainable_state(model) -> dict:
    """Trainable tensors on the CPU, keys as in the HF model (``model.vision_model.*``, ``model.connector.*``,
    ``model.text_model.layers.{i}.{self_attn|mlp}.{proj}.lora_A/B``)."""
    sd = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            sd[name] = p.detach().float().cpu().clone().contiguous()
    return sd


def load_trainable(model, sd: dict, new_lora_ok: bool = False) -> None:
    """Copy ``sd`` into the trainable parameters. With ``new_lora_ok`` (starting a new run from older weights),
    LoRA adapters the checkpoint lacks keep their initialisation (B = 0: no change to the LM yet)."""
    import torch

    params = dict(model.named_parameters())
    missing = [k for k, p in params.items() if p.requires_grad and k not in sd]
    unexpected = [k for k in sd if k not in params]
    fresh = [k for k in missing if new_lora_ok and ".lora_" in k]
    missing = [k for k in missing if k not in fresh]
    if missing or unexpected:
        raise SystemExit(f"checkpoint does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if fresh:
        print(f"{len(fresh)} LoRA tensors not in the checkpoint start fresh (B = 0)", flush=True)
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)


# ------------------------------------------------------------------------------------------ data
def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def make_batch(family, samples, pad_id: int):
    """Right-padded batch: input_ids, attention_mask, pixel_values, pixel_attention_mask, answer positions."""
    import numpy as np
    import torch

    preps = [family.prepare(s.images, s.prompt, s.answer) for s in samples]
    L = max(p.seq_len for p in preps)
    ids = np.full((len(preps), L), pad_id, np.int64)
    mask = np.zeros((len(preps), L), np.int64)
    rows, cols, targets = [], [], []
    for i, p in enumerate(preps):
        n = p.seq_len
        ids[i, :n] = p.input_ids[0]
        mask[i, :n] = 1
        for t in range(n - p.answer_len, n):  # logits at t-1 predict token t
            rows.append(i)
            cols.append(t - 1)
            targets.append(int(p.input_ids[0, t]))
    pv = np.concatenate([p.pixel["pixel_values"] for p in preps], axis=0)  # [B, 1, 3, H, W]
    pam = np.concatenate([p.pixel["pixel_attention_mask"] for p in preps], axis=0)
    return {
        "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
        "pixel_values": torch.from_numpy(pv), "pixel_attention_mask": torch.from_numpy(pam).bool(),
        "rows": torch.tensor(rows), "cols": torch.tensor(cols), "targets": torch.tensor(targets),
    }


def packed_batch(family, seeds, k: int, image_size: int, pad_id: int, layout: str = "free"):
    """One scene per row with ``k`` questions packed after its image: the prompt up to the end of the image
    block is shared, each question+answer segment attends to it and (causally) to itself only, and its
    positions continue from the shared part, so each segment sees exactly what it sees alone. The image
    block (most of the tokens) goes through the LM once for k questions."""
    import numpy as np
    import torch

    from vlmq_export.data.shapes import make_question, make_scene, render

    rows = []
    for seed in seeds:
        scene = make_scene(seed, image_size, layout)
        img = render(scene)
        qs = [make_question(scene, np.random.default_rng([int(seed), 1]))]  # the split's own question first
        rng = np.random.default_rng([int(seed), 7])
        while len(qs) < k:
            qs.append(make_question(scene, rng))
        preps = [family.prepare([img], q, a) for q, a, _ in qs]
        ids0 = preps[0].input_ids[0]
        shared = int(np.nonzero(preps[0].image_mask[0])[0][-1]) + 2  # through the closing <fake_token_around_image>
        segs = []
        for p in preps:
            if not np.array_equal(p.input_ids[0, :shared], ids0[:shared]):
                raise RuntimeError("packed questions do not share the image prefix")
            segs.append((p.input_ids[0, shared:], p.answer_len))
        rows.append((ids0[:shared], segs, preps[0].pixel))
    L = max(len(sh) + sum(len(s) for s, _ in segs) for sh, segs, _ in rows)
    B = len(rows)
    ids = np.full((B, L), pad_id, np.int64)
    pos = np.zeros((B, L), np.int64)
    mask = np.zeros((B, 1, L, L), bool)
    r_idx, c_idx, targets, seg_of = [], [], [], []
    tri = lambda n: np.tril(np.ones((n, n), bool))
    for b, (sh, segs, _) in enumerate(rows):
        n0 = len(sh)
        ids[b, :n0] = sh
        pos[b, :n0] = np.arange(n0)
        mask[b, 0, :n0, :n0] = tri(n0)
        o = n0
        for j, (seg, alen) in enumerate(segs):
            n = len(seg)
            ids[b, o:o + n] = seg
            pos[b, o:o + n] = np.arange(n0, n0 + n)
            mask[b, 0, o:o + n, :n0] = True
            mask[b, 0, o:o + n, o:o + n] = tri(n)
            for t in range(o + n - alen, o + n):
                r_idx.append(b)
                c_idx.append(t - 1)
                targets.append(int(ids[b, t]))
                seg_of.append(b * k + j)
            o += n
        for t in range(o, L):  # padding attends to itself only (no empty softmax rows)
            mask[b, 0, t, t] = True
    pv = np.concatenate([r[2]["pixel_values"] for r in rows], axis=0)
    pam = np.concatenate([r[2]["pixel_attention_mask"] for r in rows], axis=0)
    return {
        "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "position_ids": torch.from_numpy(pos),
        "pixel_values": torch.from_numpy(pv), "pixel_attention_mask": torch.from_numpy(pam).bool(),
        "rows": torch.tensor(r_idx), "cols": torch.tensor(c_idx), "targets": torch.tensor(targets),
        "segments": torch.tensor(seg_of),
    }


def answer_logits(model, batch, bf16: bool = False):
    """Logits at the answer positions only (the LM head runs on those rows alone: cheaper)."""
    import torch

    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch.get("position_ids"), pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"],
                          use_cache=False, return_dict=True)
        h = out.last_hidden_state[batch["rows"], batch["cols"]]
        return model.lm_head(h).float()


def evaluate(model, family, samples, pad_id: int, batch_size: int = 16, bf16: bool = False) -> dict:
    """Teacher-forced exact match overall and per qtype, plus the mean answer loss."""
    import torch

    per: dict[str, list[int]] = {}
    losses = []
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            b = to_device(make_batch(family, chunk, pad_id), device)
            logits = answer_logits(model, b, bf16)
            losses.append(float(torch.nn.functional.cross_entropy(logits, b["targets"])))
            pred = logits.argmax(-1)
            # SmolVLM's <end_of_utterance> row is a copy of <|im_end|>'s and the LM head is tied, so the two
            # always tie; greedy decoding stops on either, so either counts as the closing token.
            stop = torch.tensor(family.stop_token_ids, device=device)
            ok = (pred == b["targets"]) | (torch.isin(b["targets"], stop) & torch.isin(pred, stop))
            for j, s in enumerate(chunk):
                good = bool(ok[b["rows"] == j].all())
                per.setdefault(s.meta["qtype"], []).append(int(good))
    allv = [v for vs in per.values() for v in vs]
    return {"acc": sum(allv) / len(allv), "loss": sum(losses) / len(losses),
            "per_qtype": {k: sum(v) / len(v) for k, v in sorted(per.items())},
            "n_per_qtype": {k: len(v) for k, v in sorted(per.items())}}


# ------------------------------------------------------------------------------------------ auxiliary labels
from vlmq_export.data.shapes import _SIDE_BAND, COLORS as _COLORS, KINDS as _KINDS  # noqa: E402

COLOR_IDS = {c: i + 1 for i, c in enumerate(_COLORS)}
KIND_IDS = {k: i + 1 for i, k in enumerate(_KINDS)}


def cell_labels(seed: int, args):
    """[cells, 14] int64 per image token's cell (row-major grid of side image/patch/scale), about the shape covering
    most of it (at least 10 % of the cell), 0 for background: colour id, kind id, 1 if the cell holds the shape's
    centre, its horizontal band (1 left, 2 middle, 3 right) and vertical band (1 top, 2 middle, 3 bottom) as
    ShapesVQA's position questions define them, how many shapes of that kind the scene holds (0 for background)
    and 8 flags: which colours the shapes of that kind have. Plus [len(KINDS)] int64: how many shapes of each
    kind."""
    import numpy as np
    from PIL import Image, ImageDraw

    from vlmq_export.data.shapes import make_scene, shape_polygon

    scene = make_scene(seed, args.image_size, getattr(args, "layout", "free"))
    S = args.image_size
    lab = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(lab)
    for i, sh in enumerate(scene.shapes):
        if sh.kind == "circle":
            d.ellipse((sh.cx - sh.radius, sh.cy - sh.radius, sh.cx + sh.radius, sh.cy + sh.radius), fill=i + 1)
        else:
            d.polygon(shape_polygon(sh), fill=i + 1)
    a = np.asarray(lab)
    g = S // (args.patch_size * args.scale_factor)
    c = S // g
    cells = a[: g * c, : g * c].reshape(g, c, g, c).transpose(0, 2, 1, 3).reshape(g * g, c * c)
    band = lambda v: 1 if v < _SIDE_BAND * S else 3 if v > (1 - _SIDE_BAND) * S else 2  # noqa: E731
    out = np.zeros((g * g, 6 + len(COLOR_IDS)), np.int64)
    kind_colors = {kd: [0] * len(COLOR_IDS) for kd in _KINDS}
    for sh in scene.shapes:
        kind_colors[sh.kind][COLOR_IDS[sh.color] - 1] = 1
    for j, px in enumerate(cells):
        counts = np.bincount(px, minlength=len(scene.shapes) + 1)
        counts[0] = 0
        k = int(counts.argmax())
        if k and counts[k] >= 0.1 * c * c:
            sh = scene.shapes[k - 1]
            centre = (sh.cy // c) * g + (sh.cx // c) == j
            n_kind = sum(o.kind == sh.kind for o in scene.shapes)
            out[j] = (COLOR_IDS[sh.color], KIND_IDS[sh.kind], int(centre), band(sh.cx), band(sh.cy), n_kind,
                      *kind_colors[sh.kind])
    kinds = np.array([sum(sh.kind == kd for sh in scene.shapes) for kd in _KINDS], np.int64)
    return out, kinds


def aux_sizes(args) -> list[int]:
    sizes = [len(COLOR_IDS) + 1, len(KIND_IDS) + 1]
    if args.aux_extended:
        sizes += [2, 4, 4, len(KIND_IDS) * 5]
    if args.aux_scene:
        sizes += [5, len(COLOR_IDS)]
    return sizes


def aux_loss_of(aux, tokens, cell_lab, kind_counts, args):
    """The auxiliary probe's loss on the connector's image tokens [B, L, hidden]."""
    import torch

    ce = torch.nn.functional.cross_entropy
    outs = aux(tokens.float()).split(aux_sizes(args), dim=-1)  # float32 also when the forward ran under bf16 autocast
    if getattr(args, "aux_kind_on_shapes", False):  # the colour head (0 = background) finds the shapes
        shape = cell_lab[..., 1] > 0
        kind = ce(outs[1][shape], cell_lab[..., 1][shape]) if shape.any() else outs[1].sum() * 0
    else:
        kind = ce(outs[1].flatten(0, 1), cell_lab[..., 1].flatten())
    loss = ce(outs[0].flatten(0, 1), cell_lab[..., 0].flatten()) + kind
    if args.aux_extended:
        for o, col in zip(outs[2:5], (2, 3, 4)):
            loss = loss + ce(o.flatten(0, 1), cell_lab[..., col].flatten())
        # how many of each kind, from the image tokens' mean (kept in the tokens, not in one cell)
        counts = outs[5].mean(dim=1).view(-1, len(KIND_IDS), 5)
        loss = loss + ce(counts.flatten(0, 1), kind_counts.clamp_max(4).flatten())
    if args.aux_scene:
        shape = cell_lab[..., 1] > 0  # cells on a shape only: background has no kind to answer about
        loss = loss + ce(outs[6][shape], cell_lab[..., 5][shape].clamp_max(4))
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(outs[7][shape], cell_lab[..., 6:][shape].float())
    return loss


def probe_accuracy(aux, tokens, cell_lab, kind_counts, args) -> dict:
    """The auxiliary probe's accuracy per head: colour, kind and (with --aux-extended) the left/right and top/bottom
    bands on the cells a shape covers, the centre flag on all cells, each kind's count per image. Which of them the
    vision tower has learned tells which question types it can answer (a question names a kind)."""
    import torch

    with torch.no_grad():
        outs = aux(tokens.float()).split(aux_sizes(args), dim=-1)
        shape = cell_lab[..., 1] > 0
        hit = lambda o, col: (o.argmax(-1) == cell_lab[..., col])  # noqa: E731
        acc = {"color": hit(outs[0], 0)[shape], "kind": hit(outs[1], 1)[shape]}
        if args.aux_extended:
            acc.update(x_band=hit(outs[3], 3)[shape], y_band=hit(outs[4], 4)[shape], centre=hit(outs[2], 2).flatten())
            counts = outs[5].mean(dim=1).view(-1, len(KIND_IDS), 5).argmax(-1)
            acc["kind_count"] = (counts == kind_counts.clamp_max(4)).flatten()
    return {k: round(float(v.float().mean()), 4) for k, v in acc.items()}


def word_targets(model, family) -> dict:
    """The LM's input embedding of each describing word (mean over its tokens, with the leading space
    the words have inside an answer): colours and kinds by id, counts 0-4, and the side words by band."""
    import torch

    E = model.model.text_model.embed_tokens.weight.detach()
    tok = family.tokenizer

    def word(w):
        return E[tok(" " + w, add_special_tokens=False)["input_ids"]].mean(0)
    zero = torch.zeros(E.shape[1], device=E.device)
    return {"color": torch.stack([word(c) for c in COLOR_IDS]), "kind": torch.stack([word(k) for k in KIND_IDS]),
            "count": torch.stack([word(str(i)) for i in range(5)]),
            "x": torch.stack([zero, word("left"), zero, word("right")]),
            "y": torch.stack([zero, word("top"), zero, word("bottom")])}


def embed_loss(tokens, cell_lab, words):
    """Relative squared distance between each shape cell's token and its bag of word embeddings (scaled by
    1/sqrt(words) to keep an embedding's norm); background cells are left free."""
    shape = cell_lab[..., 1] > 0
    lab = cell_lab[shape]
    tokens = tokens.float()
    t = (words["color"][lab[:, 0] - 1] + words["kind"][lab[:, 1] - 1] + words["count"][lab[:, 5].clamp_max(4)]
         + words["x"][lab[:, 3]] + words["y"][lab[:, 4]])
    n = 3 + (lab[:, 3] != 2).float() + (lab[:, 4] != 2).float()
    t = t / n.sqrt().unsqueeze(1)
    return ((tokens[shape] - t) ** 2).sum(-1).mean() / (t ** 2).sum(-1).mean()


def aux_batch(seeds, args):
    import numpy as np
    import torch

    labs = [cell_labels(s, args) for s in seeds]
    return torch.from_numpy(np.stack([cl for cl, _ in labs])), torch.from_numpy(np.stack([kc for _, kc in labs]))


def image_batch(family, seeds, args, device):
    """pixel_values, pixel_attention_mask of the scenes of ``seeds`` (images only, no prompt)."""
    import numpy as np
    import torch

    from vlmq_export.data.shapes import make_scene, render

    pix = [family.prepare([render(make_scene(sd, args.image_size, getattr(args, "layout", "free")))], "?").pixel for sd in seeds]
    pv = torch.from_numpy(np.concatenate([p["pixel_values"] for p in pix])).to(device)
    pam = torch.from_numpy(np.concatenate([p["pixel_attention_mask"] for p in pix])).bool().to(device)
    return pv, pam


PROBE_VAL = 64  # validation scenes the probe is checked on (from the end of the val split: no VQA val sample)


def probe_batch(family, args, device) -> tuple:
    from vlmq_export.data.shapes import SPLITS

    seeds = list(SPLITS["val"][-PROBE_VAL:])
    return (*image_batch(family, seeds, args, device), *(t.to(device) for t in aux_batch(seeds, args)))


def probe_eval(model, aux, captured, check, args) -> dict:
    import torch

    pv, pam, cell_lab, kind_counts = check
    was = model.training
    model.eval()
    with torch.no_grad():
        model.model.get_image_features(pixel_values=pv, pixel_attention_mask=pam)
    model.train(was)
    return probe_accuracy(aux, captured["connector"], cell_lab, kind_counts, args)


def pretrain_vision(model, family, aux, captured, check, args, log, words=None) -> None:
    """Stage 1: the vision tower + connector learn the auxiliary probe's targets from images alone (the probe
    checked on ``check``, :func:`probe_batch`)."""
    import torch

    params = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n] + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=args.pretrain_lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    schedule = argparse.Namespace(warmup=max(1, args.pretrain_steps // 20), steps=args.pretrain_steps)
    dev = next(aux.parameters()).device
    batches = iter(torch.utils.data.DataLoader(
        PretrainBatches(family, args), batch_size=None, sampler=range(args.pretrain_steps), num_workers=args.workers,
        pin_memory=dev.type == "cuda", **({"prefetch_factor": 4} if args.workers else {})))
    t_all = time.perf_counter()
    for ps in range(args.pretrain_steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = args.pretrain_lr * lr_at(ps, schedule)
        pv, pam, cell_lab, kind_counts = (t.to(dev, non_blocking=True) for t in next(batches))
        opt.zero_grad(set_to_none=True)
        model.model.get_image_features(pixel_values=pv, pixel_attention_mask=pam)
        loss = aux_loss_of(aux, captured["connector"], cell_lab, kind_counts, args)
        emb = embed_loss(captured["connector"], cell_lab, words) if words is not None else None
        if emb is not None:
            loss = loss + args.aux_embed * emb
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        if (ps + 1) % args.log_every == 0 or ps == 0:
            print(f"pretrain {ps + 1}/{args.pretrain_steps} aux loss {float(loss.detach()):.4f}"
                  + (f" (word-embedding part {float(emb.detach()):.4f})" if emb is not None else "")
                  + f" {time.perf_counter() - t0:.2f}s/step", flush=True)
            log({"event": "pretrain", "step": ps + 1, "aux_loss": float(loss.detach()), "step_s": round(time.perf_counter() - t0, 2)})
        if (ps + 1) % args.eval_every == 0 or ps + 1 == args.pretrain_steps:
            acc = probe_eval(model, aux, captured, check, args)
            print(f"pretrain {ps + 1}: probe accuracy on {PROBE_VAL} validation scenes {acc}", flush=True)
            log({"event": "pretrain_probe", "step": ps + 1, "probe_val": acc})
    log({"event": "pretrain_end", "steps": args.pretrain_steps, "wall_s": round(time.perf_counter() - t_all, 1)})


class PretrainBatches:
    """Vision-only pretraining step ``s``'s batch (map-style, for DataLoader workers): the images and auxiliary
    labels of ``pretrain_batch`` scenes from the second half of the train split (``data_offset`` shifts them)."""

    def __init__(self, family, args):
        self.family, self.args = family, args

    def __getitem__(self, step: int) -> tuple:
        from vlmq_export.data.shapes import SPLITS

        a = self.args
        first = len(SPLITS["train"]) // 2 + a.data_offset + step * a.pretrain_batch
        seeds = [SPLITS["train"][first + i] for i in range(a.pretrain_batch)]
        return (*image_batch(self.family, seeds, a, "cpu"), *aux_batch(seeds, a))


class TrainBatches:
    """Training step ``s``'s batch (map-style, so a DataLoader's workers can build batches ahead in order):
    train-split seeds ``data_offset + s*batch ..``, packed questions, auxiliary labels when asked."""

    def __init__(self, family, args, pad_id: int, with_aux: bool):
        self.family, self.args, self.pad_id, self.with_aux = family, args, pad_id, with_aux

    def __getitem__(self, step: int) -> dict:
        from vlmq_export.data.shapes import SPLITS

        a = self.args
        seeds = [SPLITS["train"][a.data_offset + step * a.batch + i] for i in range(a.batch)]
        b = packed_batch(self.family, seeds, a.questions, a.image_size, self.pad_id, a.layout)
        if self.with_aux:
            b["cell_labels"], b["kind_counts"] = aux_batch(seeds, a)
        return b


# ------------------------------------------------------------------------------------------ main
def build_model(args, base_dir: Path):
    import torch

    from vlmq_export.models import load_family
    from vlmq_export.testbed.smolvlm_smollm2 import make_smolvlm_with_smollm2
    from vlmq_export.testing.tiny_smolvlm import make_tiny_smolvlm

    geometry = {k: getattr(args, k) for k in GEOMETRY_KEYS}
    if args.text_model == "tiny":  # the tiny model's own (small) vision tower; the geometry keys that fit it
        geometry = {"text_model": "tiny", **{k: geometry[k] for k in ("image_size", "patch_size", "scale_factor")}}
    stamp = base_dir / "geometry.json"
    if not (base_dir / "config.json").is_file() or not stamp.is_file() or json.loads(stamp.read_text()) != geometry:
        if args.text_model == "tiny":
            make_tiny_smolvlm(base_dir, seed=args.seed, image_size=args.image_size, patch_size=args.patch_size,
                              scale_factor=args.scale_factor)
        else:
            make_smolvlm_with_smollm2(base_dir, seed=args.seed, **geometry)
        stamp.write_text(json.dumps(geometry))
    family = load_family(base_dir)
    model = family.load_model(base_dir)
    # from-scratch vision tower + connector: seeded re-initialisation (independent of how base/ was made)
    torch.manual_seed(args.seed)
    inner = model.model
    for m in list(inner.vision_model.modules()) + list(inner.connector.modules()):
        if hasattr(m, "reset_parameters") and m is not inner.vision_model:
            m.reset_parameters()
    emb = inner.vision_model.embeddings
    torch.nn.init.normal_(emb.position_embedding.weight, std=0.02)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in list(inner.vision_model.parameters()) + list(inner.connector.parameters()):
        p.requires_grad_(True)
    if args.lora_rank:
        add_lora(model, args.lora_rank, args.lora_targets.split(","), args.seed)
    return family, model


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%H", "--", "tools/train_shapes_vlm.py"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def export_assets(args) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(args.out)
    src = Path(args.from_ or out / "best.safetensors")
    log_path = out / "log.jsonl"
    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.is_file() else []
    if src.suffix == ".pt":  # the last checkpoint (e.g. when the accuracy metric cannot be trusted)
        ck = torch.load(src, weights_only=False, map_location="cpu")
        sd = ck["weights"]
        last = next((r for r in reversed(recs) if r.get("event") == "val" and r["step"] == ck["step"]), None)
        info = {**{k: v for k, v in ck["config"].items() if k in ("seed", "batch", "lr", "lora_rank", "lora_lr")},
                "step": ck["step"], "from": "last.pt",
                "val": {k: last[k] for k in ("acc", "loss", "per_qtype", "n_per_qtype")} if last else None}
    else:
        sd = load_file(str(src))
        info = json.loads((src.with_suffix(".json")).read_text())
    dest = Path(args.export_assets)
    dest.mkdir(parents=True, exist_ok=True)
    vision = {k: v.to(torch.float32).contiguous() for k, v in sd.items() if ".lora_" not in k}
    # LoRA factors in float16 (merged in float32 at assembly): attention + MLP adapters in float32 would take the
    # committed parts past their 25 MB allowance; the factors' values (|A| ~ 1/sqrt(576), small B) lose nothing
    # float16 cannot hold but the last few mantissa bits.
    lora = {k: v.to(torch.float16).contiguous() for k, v in sd.items() if ".lora_" in k}
    save_file(vision, str(dest / "vision_connector.safetensors"))
    if lora:
        save_file(lora, str(dest / "lora.safetensors"))
    elif (dest / "lora.safetensors").exists():
        (dest / "lora.safetensors").unlink()
    meta = dict(info)
    if lora:
        meta.setdefault("lora_scale", 1.0)
    meta["files"] = sorted(p.name for p in dest.iterdir() if p.suffix == ".safetensors")
    if recs:  # how the run went: every (re)start with its flags, the validation curve
        meta["runs"] = [{"from_step": r["step"], "flags": {k: v for k, v in r["config"].items() if k != "out"}}
                        for r in recs if r.get("event") == "start"]
        meta["val_curve"] = [{"step": r["step"], "acc": round(r["acc"], 4), "loss": round(r["loss"], 4),
                              "train_minutes": round(r.get("train_s", 0) / 60, 1)} for r in recs if r.get("event") == "val"]
        ends = [r for r in recs if r.get("event") == "end"]
        if ends:
            meta["final_step"] = ends[-1]["step"]
    (dest / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    acc = f"val acc {info['val']['acc']:.3f}" if info.get("val") else "not evaluated"
    print(f"wrote {dest}: {meta['files']} (step {info['step']}, {acc})", flush=True)
    if args.test_n:
        record_test(dest, args.test_n, args.threads)


def record_test(dest: Path, n: int, threads: int) -> None:
    """:func:`test_accuracy` of the parts in ``dest`` into their meta.json's ``test``."""
    meta = json.loads((dest / "meta.json").read_text())
    t = meta["test"] = test_accuracy(dest, n, threads)
    (dest / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{dest / 'meta.json'}: test accuracy {t['accuracy']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}] on "
          f"{t['n']} samples ({t['seconds']:.0f} s): " + ", ".join(f"{k} {v:.3f}" for k, v in t["per_qtype"].items()))


def test_accuracy(assets: Path, n: int, threads: int) -> dict:
    """Greedy exact match of the testbed assembled from ``assets`` (as ``builtin:shapes-smolvlm`` is) on the first
    ``n`` test-split samples in its layout, in torch float32, with 95 % Wilson intervals overall and per question
    type: what meta.json records as the testbed's full-precision accuracy (the recipes were chosen on val)."""
    import tempfile

    import torch

    from vlmq_export.models import load_family
    from vlmq_export.testbed import evaluate_torch, testbed_layout
    from vlmq_export.testbed.assemble import make_shapes_smolvlm

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        path = make_shapes_smolvlm(Path(d) / "testbed", assets=assets)
        family = load_family(path)
        model = family.load_checked(path)

        def progress(i, total, res):
            if i % 100 == 0 or i == total:
                print(f"  test {i}/{total}: accuracy {res['accuracy']:.3f}", flush=True)

        res = evaluate_torch(family, model, n=n, split="test", layout=testbed_layout(path), progress=progress)
    keep = ("accuracy", "ci95", "per_qtype", "per_qtype_ci95", "n", "n_per_qtype", "correct", "interval", "split",
            "seconds")
    return {**{k: res[k] for k in keep}, "metric": "greedy exact match (torch float32, the assembled testbed)"}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.export_assets:
        export_assets(args)
        return 0
    if args.measure_test:  # committed parts exported before meta.json had their test accuracy
        record_test(Path(args.measure_test), args.test_n or 1000, args.threads)
        return 0
    import torch
    from safetensors.torch import load_file, save_file

    from vlmq_export.data.shapes import SPLITS, make_split

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    family, model = build_model(args, out / "base")
    model.to(device)
    if args.bf16:  # image features back to float32 before SmolVLM merges them into the (float32) text embeddings:
        # transformers 5.17's inputs_merger refuses bf16 features there under CUDA autocast
        model.model.connector.register_forward_hook(lambda mod, inp, out: out.float())
    pad_id = int(family.tokenizer.pad_token_id if family.tokenizer.pad_token_id is not None else 0)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    vis = [p for n, p in named if ".lora_" not in n]
    lora = [p for n, p in named if ".lora_" in n]
    groups = [{"params": vis, "lr": args.lr, "weight_decay": args.weight_decay}]
    if lora:
        groups.append({"params": lora, "lr": args.lora_lr, "weight_decay": 0.0})
    aux, captured, words = None, {}, None
    if args.aux_scene and not args.aux_extended:
        raise SystemExit("--aux-scene needs --aux-extended")
    if (args.aux_embed > 0 or args.pretrain_steps) and args.aux_weight <= 0:
        raise SystemExit("--aux-embed and --pretrain-steps need the auxiliary probe (--aux-weight > 0)")
    if args.aux_weight > 0:
        torch.manual_seed(args.seed + 2)
        aux = torch.nn.Linear(family.hidden_size, sum(aux_sizes(args))).to(device)
        words = word_targets(model, family) if args.aux_embed > 0 else None
        groups.append({"params": list(aux.parameters()), "lr": args.lr, "weight_decay": 0.0})
        model.model.connector.register_forward_hook(lambda mod, inp, out: captured.__setitem__("connector", out))
        named = named + [(f"aux.{n}", p) for n, p in aux.named_parameters()]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98))
    peak = [g["lr"] for g in opt.param_groups]
    n_train = sum(p.numel() for p in vis) + sum(p.numel() for p in lora)
    print(f"trainable: vision+connector {sum(p.numel() for p in vis):,}, lora {sum(p.numel() for p in lora):,}", flush=True)

    step, best, train_s, last_eval = 0, -1.0, 0.0, -1
    if args.resume and (out / "last.pt").is_file():
        ck = torch.load(out / "last.pt", weights_only=False, map_location=device)
        if ck.get("config", {}).get("layout", "free") != args.layout:
            raise SystemExit(f"--resume: {out} was trained on the {ck['config'].get('layout', 'free')!r} layout, "
                             f"not {args.layout!r}; pass the run's own --layout")
        load_trainable(model, ck["weights"])
        if aux is not None and "aux" in ck:
            aux.load_state_dict(ck["aux"])
        opt.load_state_dict(ck["opt"])
        step, best, train_s = ck["step"], ck["best"], ck["train_s"]
        print(f"resumed at step {step} (best val {best:.3f}, {train_s / 60:.1f} min trained)", flush=True)
    elif args.init:
        src = Path(args.init)
        if src.is_dir():  # an assets folder: vision_connector.safetensors (+ lora.safetensors)
            init = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        elif src.suffix == ".pt":
            init = torch.load(src, weights_only=False, map_location="cpu")["weights"]
        else:
            init = load_file(str(src))
        load_trainable(model, init, new_lora_ok=True)
        print(f"initialised from {args.init}", flush=True)

    val = make_split("val", args.n_val, args.image_size, layout=args.layout)
    probe_check = probe_batch(family, args, device) if aux is not None else None
    log_f = open(out / "log.jsonl", "a")

    def log(rec):
        rec = {"time": round(time.time(), 1), **rec}
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()

    config = {k: v for k, v in vars(args).items() if k not in ("bench", "export_assets", "from_")}
    log({"event": "start", "step": step, "config": config, "trainable_params": n_train})
    if args.pretrain_steps and step == 0 and not args.bench:
        pretrain_vision(model, family, aux, captured, probe_check, args, log, words)

    def save_last():
        tmp = out / "last.pt.tmp"
        torch.save({"weights": trainable_state(model), "opt": opt.state_dict(), "step": step, "best": best,
                    **({"aux": aux.state_dict()} if aux is not None else {}),
                    "train_s": train_s, "config": config}, tmp)
        os.replace(tmp, out / "last.pt")

    def do_eval():
        nonlocal best, last_eval
        last_eval = step
        t0 = time.perf_counter()
        r = evaluate(model, family, val, pad_id, bf16=args.bf16)
        if aux is not None:
            r["probe_val"] = probe_eval(model, aux, captured, probe_check, args)
        model.train()
        r["eval_s"] = round(time.perf_counter() - t0, 1)
        print(f"[val] step {step}: acc {r['acc']:.3f} loss {r['loss']:.4f} "
              + " ".join(f"{k} {v:.2f}" for k, v in r["per_qtype"].items()) + f" ({r['eval_s']}s)"
              + (f"; probe {r['probe_val']}" if "probe_val" in r else ""), flush=True)
        log({"event": "val", "step": step, **r, "train_s": round(train_s, 1)})
        if r["acc"] > best:
            best = r["acc"]
            save_file(trainable_state(model), str(out / "best.safetensors"))
            info = {"seed": args.seed, "step": step, "steps_planned": args.steps, "batch": args.batch,
                    "lr": args.lr, "lora_rank": args.lora_rank, "lora_lr": args.lora_lr if args.lora_rank else None,
                    "lora_targets": args.lora_targets.split(",") if args.lora_rank else [],
                    "lora_scale": 1.0 if args.lora_rank else None,  # alpha = rank
                    "warmup": args.warmup, "weight_decay": args.weight_decay, "clip": args.clip, "bf16": args.bf16,
                    "geometry": {k: getattr(args, k) for k in GEOMETRY_KEYS},
                    "data": {"dataset": "shapesvqa", "layout": args.layout},
                    "image_seq_len": family.image_seq_len,
                    "train_samples_seen": step * args.batch, "train_split_seeds": [SPLITS["train"][0], SPLITS["train"][0] + step * args.batch],
                    "val": {"n": len(val), "split": "val", "metric": "teacher-forced exact match",
                            **{k: r[k] for k in ("acc", "loss", "per_qtype", "n_per_qtype")}},
                    "train_minutes": round(train_s / 60, 1), "threads": args.threads, "device": str(device),
                    **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
                    **({"init": args.init} if args.init else {}), "data_offset": args.data_offset,
                    "script": "tools/train_shapes_vlm.py", "script_commit": git_commit(),
                    "torch": torch.__version__}
            (out / "best.json").write_text(json.dumps(info, indent=2) + "\n")
        return r

    model.train()
    t_start = time.perf_counter()
    loss_ema = None
    batches = iter(torch.utils.data.DataLoader(
        TrainBatches(family, args, pad_id, with_aux=aux is not None), batch_size=None,
        sampler=range(step, args.steps), num_workers=args.workers, pin_memory=device.type == "cuda",
        **({"prefetch_factor": 4, "persistent_workers": False} if args.workers else {})))
    budget_from, first_step = None, step  # the budget times this invocation's steps (also after --resume)
    while step < args.steps:
        if args.bench and step >= args.bench:
            break
        if train_s / 60 > args.max_minutes:
            print(f"time limit reached at step {step}", flush=True)
            break
        if args.budget_minutes and step == first_step + 5:  # steps 1-5 warm up (allocations, data workers)
            budget_from = (time.perf_counter(), step)
        if args.budget_minutes and step == first_step + 25 and budget_from is not None:
            per_step = (time.perf_counter() - budget_from[0]) / (step - budget_from[1])
            left = args.budget_minutes * 60 - (time.perf_counter() - t_start)
            fit = step + max(0, int(0.95 * left / per_step))
            if fit < args.steps:
                print(f"budget {args.budget_minutes} min at {per_step:.3f} s/step: {fit} steps (was {args.steps})", flush=True)
                args.steps = fit
            log({"event": "budget", "step": step, "step_s": round(per_step, 4), "steps": args.steps})
            if step >= args.steps:  # nothing more fits
                break
        t0 = time.perf_counter()
        b = to_device(next(batches), device)
        t_data = time.perf_counter() - t0
        f = lr_at(step, args)
        for g, pk in zip(opt.param_groups, peak):
            g["lr"] = pk * f
        opt.zero_grad(set_to_none=True)
        logits = answer_logits(model, b, args.bf16)
        loss = torch.nn.functional.cross_entropy(logits, b["targets"])
        aux_loss = None
        if aux is not None:
            aux_loss = aux_loss_of(aux, captured["connector"], b["cell_labels"], b["kind_counts"], args)
            total = loss + args.aux_weight * aux_loss
            if words is not None:
                total = total + args.aux_embed * embed_loss(captured["connector"], b["cell_labels"], words)
            total.backward()
        else:
            loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([p for _, p in named], args.clip)
        opt.step()
        dt = time.perf_counter() - t0
        train_s += dt
        step += 1
        lv = float(loss.detach())
        loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
        if args.bench:
            print(f"step {step}: {dt:.2f}s (waiting for data {t_data:.2f}s) loss {lv:.4f} seq {b['input_ids'].shape[1]}", flush=True)
            continue
        if step % args.log_every == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {lv:.4f} ema {loss_ema:.4f} gnorm {float(gn):.2f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {dt:.2f}s/step ({train_s / 60:.1f} min)", flush=True)
            if aux_loss is not None:
                print(f"    aux loss {float(aux_loss.detach()):.4f}", flush=True)
            log({"event": "train", "step": step, "loss": lv, "aux_loss": None if aux_loss is None else float(aux_loss.detach()), "loss_ema": loss_ema, "grad_norm": float(gn),
                 "lr": opt.param_groups[0]["lr"], "step_s": round(dt, 2), "train_s": round(train_s, 1)})
        if step % args.eval_every == 0:
            do_eval()
        if step % args.ckpt_every == 0:
            save_last()
    if args.bench:
        return 0
    if last_eval != step:
        do_eval()
    save_last()
    log({"event": "end", "step": step, "best": best, "train_s": round(train_s, 1),
         "wall_s": round(time.perf_counter() - t_start, 1)})
    print(f"done: step {step}, best val acc {best:.3f}, {train_s / 60:.1f} min training", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
