"""Parity harness for the multimodal model: fixed interleaved batches with real image and audio
preprocessing, a task that builds the real `MultimodalModel` (encoders, projectors, fusion,
modality expert groups), and the single-process run a layout must reproduce.

Data: `make_mm_rows` builds each step's global batch as packed `Row`s (the multimodal
loader's own row type, collated by its `collate_rows`): random text tokens with whole
placeholder runs for synthetic images (random pixels through the patch encoder's real
preprocessing) and synthetic audio clips (noise of varying length through the real log-mel
front end, so clips take different token counts). Rows draw their media at random, and on odd
steps the second half of the batch holds text only, so some ranks get no image or audio
token at all while others do: the case where every rank must still enter every modality
group's all-to-all.

Every row carries the same number of label targets (`targets_per_row`; extra text positions
are made non-targets, as padding is). Why: the LM loss is a token mean per micro-batch, so
with equal targets per row the mean over any rows equals the mean of their equal-sized
parts, and a layout's objective (mean over ranks and micro-batches) equals one process's.

Reference: the same `Trainer`, one process, `train.grad_accum` = the layout's number of aux
domains (see `mmfm.parallel.runner`): data-parallel rank r's micro-batch j holds the same
rows as the reference's micro-batch (r·chunks + j), and with expert parallelism micro-batch j
of an ep group's ranks forms one domain, matched by one reference micro-batch over their rows
(the reference reads each step's rows reordered so every domain is contiguous:
`domain_order`). So the single-process run optimizes the same objective
on the same tokens, and only the layout differs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image

from mmfm.data.mm_pack import NO_TARGET, Row, collate_rows
from mmfm.encoders.config import EncoderConfig
from mmfm.encoders.media import Waveform
from mmfm.encoders.registry import build_preprocessor
from mmfm.parallel.config import ParallelConfig
from mmfm.parallel.runner import RunResult, distributed_run

# Special tokens at the top of the vocabulary (the harness has no tokenizer).
SPECIALS = ("image_start", "image", "image_end", "audio_start", "audio", "audio_end")
MODALITY_OF_GROUP = {1: "image", 2: "audio"}


def special_ids(vocab: int) -> dict[str, int]:
    return {name: vocab - len(SPECIALS) + i for i, name in enumerate(SPECIALS)}


def tiny_encoders() -> dict[str, EncoderConfig]:
    """32 px images in 16 px patches (4 tokens each), 8x-subsampled 40-bin log-mel audio."""
    return {"image": EncoderConfig(kind="patch", width=32, layers=1, heads=2, image_size=32,
                                   patch_size=16),
            "audio": EncoderConfig(kind="whisper", width=32, layers=1, heads=2, n_mels=40,
                                   subsample=8, max_seconds=1.0)}


def preprocessors(encoders: dict[str, EncoderConfig]) -> dict:
    return {m: build_preprocessor(c) for m, c in encoders.items()}


def make_mm_rows(steps: int, rows: int, seq_len: int, vocab: int,
                 encoders: dict[str, EncoderConfig], seed: int = 1,
                 targets_per_row: int | None = None) -> list[list[Row]]:
    """`steps` global batches of `rows` packed rows (seq_len + 1 tokens each)."""
    rng = np.random.default_rng(seed)
    pre = preprocessors(encoders)
    ids = special_ids(vocab)
    text_vocab = vocab - len(SPECIALS)
    out = []
    for step in range(steps):
        batch = []
        for r in range(rows):
            text_only = step % 2 == 1 and r >= rows // 2
            kinds = [] if text_only else [m for m in ("image", "audio") if rng.random() < 0.6]
            batch.append(_row(rng, seq_len + 1, text_vocab, ids, pre, kinds))
        out.append(batch)
    target = targets_per_row or min(_targets(row) for b in out for row in b)
    for batch in out:
        for row in batch:
            _limit_targets(row, target)
    return out


def _row(rng: np.random.Generator, length: int, text_vocab: int, ids: dict[str, int],
         pre: dict, kinds: list[str]) -> Row:
    """One row: text, then each media run (markers + placeholders) at a random place; text
    after a run is that modality's target group. Runs end before the row's last position,
    so every placeholder is an input position."""
    tokens = rng.integers(0, text_vocab, length).astype(np.int64)
    groups = np.zeros(length, dtype=np.int8)
    media, pos = [], 1 + int(rng.integers(0, 4))
    for kind in kinds:
        raw = _raw_media(rng, kind)
        count = int(pre[kind].num_tokens(raw))
        run = [ids[f"{kind}_start"]] + [ids[kind]] * count + [ids[f"{kind}_end"]]
        if pos + len(run) >= length - 2:
            break
        tokens[pos:pos + len(run)] = run
        groups[pos:pos + len(run)] = NO_TARGET
        groups[pos + len(run):] = 1 if kind == "image" else 2
        media.append((kind, pre[kind].preprocess(raw), count))
        pos += len(run) + 1 + int(rng.integers(0, 3))
    return Row(tokens, groups, np.zeros(length, dtype=np.int32), media)


def _raw_media(rng: np.random.Generator, kind: str):
    if kind == "image":
        return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    seconds = float(rng.choice([0.25, 0.4, 0.55]))
    return Waveform((rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32), 16000)


def _targets(row: Row) -> int:
    return int((row.groups[1:] >= 0).sum())


def _limit_targets(row: Row, target: int) -> None:
    """Make the last text targets of `row` non-targets until it has exactly `target`."""
    extra = _targets(row) - target
    for pos in range(len(row.groups) - 1, 0, -1):
        if extra == 0:
            break
        if row.groups[pos] >= 0:
            row.groups[pos] = NO_TARGET
            extra -= 1


class FixedMMLoader:
    """This rank's rows of each global batch, cut into `chunks` micro-batches, collated by the
    multimodal loader's `collate_rows`; its position checkpoints."""

    def __init__(self, batches: list[list[Row]], rank: int, world_size: int, chunks: int,
                 pre: dict) -> None:
        self.batches, self.rank, self.world_size, self.chunks = batches, rank, world_size, chunks
        self.pre = pre
        self.position = 0
        self.skipped: dict[str, int] = {}

    def __iter__(self) -> FixedMMLoader:
        return self

    def __next__(self):
        step, j = divmod(self.position, self.chunks)
        self.position += 1
        rows = self.batches[step]
        per_rank = len(rows) // self.world_size
        per_chunk = per_rank // self.chunks
        start = self.rank * per_rank + j * per_chunk
        return collate_rows(rows[start:start + per_chunk], self.pre)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class FixedMMTask:
    """A `Task` on fixed multimodal rows: the real multimodal model and loss."""

    def __init__(self, model_cfg, encoders: dict[str, EncoderConfig], routing: str,
                 groups: dict[str, int], batches: list[list[Row]], grad_accum: int,
                 eval_rows: list[Row] | None = None) -> None:
        self.model_cfg, self.encoders = model_cfg, encoders
        self.routing, self.groups = routing, dict(groups)
        self.batches, self.grad_accum = batches, grad_accum
        self.eval_rows = eval_rows  # one validation batch of these rows (none if None)
        self.loader: FixedMMLoader | None = None

    def build_model(self):
        from mmfm.encoders.projector import Projector
        from mmfm.encoders.registry import default_registry
        from mmfm.model.decoder import Decoder
        from mmfm.model.fusion import EncoderSlot, MultimodalModel, install_modality_moe

        decoder = Decoder(self.model_cfg)
        install_modality_moe(decoder, self.routing, self.groups)
        registry = default_registry()
        slots = {}
        for modality, enc in self.encoders.items():
            encoder = registry.build(enc.kind, cfg=enc)
            projector = Projector(enc.projector, encoder.out_dim, self.model_cfg.d_model)
            slots[modality] = EncoderSlot(encoder, projector, enc.train_mode,
                                          enc.unfreeze_after_steps, enc)
        ids = special_ids(self.model_cfg.vocab_size)
        return MultimodalModel(decoder, slots, {m: ids[m] for m in slots},
                               grad_accum=self.grad_accum)

    def train_loader(self, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> FixedMMLoader:
        self.loader = FixedMMLoader(self.batches, rank, world_size, self.grad_accum,
                                    preprocessors(self.encoders))
        return self.loader

    def eval_batches(self) -> list:
        if not self.eval_rows:
            return []
        return [collate_rows(self.eval_rows, preprocessors(self.encoders))]

    def loss(self, model, batch):
        from mmfm.train.multimodal import multimodal_loss

        return multimodal_loss(model, batch, document_mask=False)

    def token_loss_metrics(self, batch, token_loss_BT: torch.Tensor) -> dict[str, float]:
        """The per-group metrics of `loss` from a pipeline's recorded token losses."""
        from mmfm.train.multimodal import IGNORE_INDEX, group_metrics

        return group_metrics(token_loss_BT, batch.labels != IGNORE_INDEX, batch, {})


def aux_domains_per_step(pcfg: ParallelConfig, tcfg, world_size: int) -> int:
    """Micro-batches the single-process reference cuts each global batch into: one per aux
    domain of the layout (a data rank's micro-batch, or micro-batch j of an ep group's ranks)."""
    dp = pcfg.resolved_dp(world_size)
    return dp // pcfg.ep * layout_chunks(pcfg, tcfg)


def layout_chunks(pcfg: ParallelConfig, tcfg) -> int:
    """Micro-batches per data rank and step (the pipeline's, or gradient accumulation's)."""
    return pcfg.microbatches if pcfg.pp > 1 else tcfg.grad_accum


def domain_order(rows: int, dp: int, ep: int, chunks: int) -> list[int]:
    """Row order that makes each aux domain contiguous: for each ep group g and micro-batch j,
    chunk j of each of the group's data ranks in turn. Without expert parallelism (ep = 1) it
    is the identity: a domain is one rank's chunk, already contiguous. Reordering the rows of
    a step does not change the objective: every row has the same number of targets."""
    per_rank = rows // dp
    per_chunk = per_rank // chunks
    order = []
    for group in range(dp // ep):
        for j in range(chunks):
            for member in range(ep):
                start = (group * ep + member) * per_rank + j * per_chunk
                order.extend(range(start, start + per_chunk))
    return order


def mm_distributed_run(model_cfg, pcfg: ParallelConfig, tcfg, batches: list[list[Row]],
                       encoders: dict[str, EncoderConfig], routing: str,
                       groups: dict[str, int], **kwargs) -> RunResult:
    """`distributed_run` with the multimodal task (collective). The loader hands out
    `train.grad_accum` micro-batches per step, as the multimodal task's does; under pipeline
    parallelism the step re-cuts their rows into `parallel.microbatches`."""
    task = FixedMMTask(model_cfg, encoders, routing, groups, batches, tcfg.grad_accum)
    return distributed_run(model_cfg, pcfg, tcfg, batches, task=task, **kwargs)


def mm_reference_run(model_cfg, pcfg: ParallelConfig, tcfg, world_size: int,
                     batches: list[list[Row]], encoders: dict[str, EncoderConfig],
                     routing: str, groups: dict[str, int], **kwargs) -> RunResult:
    """The single-process run a layout of `world_size` processes must reproduce (one rank,
    gradient accumulation over the layout's aux domains; run inside a 1-process group)."""
    domains = aux_domains_per_step(pcfg, tcfg, world_size)
    order = domain_order(len(batches[0]), pcfg.resolved_dp(world_size), pcfg.ep,
                         layout_chunks(pcfg, tcfg))
    reordered = [[step[i] for i in order] for step in batches]
    single = ParallelConfig(engine="ddp")
    ref_tcfg = dataclasses.replace(tcfg, grad_accum=domains)
    return mm_distributed_run(model_cfg, single, ref_tcfg, reordered, encoders, routing, groups,
                              **kwargs)
