"""The demo pipeline: pretrain, adapt, merge, evaluate, check.

Stages: (1) generate the world; (2) pretrain a network on the generic ``pretrain`` family
(stands in for ImageNet); (3) source-only training on the labeled ``game`` domain from the
pretrained backbone and a seeded head: the shared starting point of every adaptation run;
(4) one STDA run per target from those shared weights; (5) the data-combination run (same
recipe, several targets' images at once); (6) one extra STDA run from a different random
initialisation (for the interpolation ablation); (7) merges through ``domainmerge.merging``;
(8) evaluation of everything on every target's labeled val split; (9) the paper's claims
judged from bootstrap intervals over val images (PASS/FAIL/TIE lines, ``claims``), results.json,
results.md and plots.

Every number is measured in the run; nothing is hard-coded but the hyper-parameters.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from domainmerge.analysis.lmc import barriers, lambda_grid, scan
from domainmerge.checkpoint import DA_TRAINING
from domainmerge.data.readers import SegDataset
from domainmerge.data.synthetic import SOURCE, TARGETS, SyntheticDataset
from domainmerge.data.training import CropConfig
from domainmerge.demo.claims import ALL_CHECKS, Judge, Stat, format_check, judged, not_tested
from domainmerge.demo.jobs import Pool
from domainmerge.demo.records import (
    BUFFER_RULES,
    COMBINED_ALL,
    DIFFINIT,
    SOURCE_ONLY,
    Check,
    Curve,
    DemoResults,
    InterpolationCurves,
    MethodsResult,
    combined,
    group,
    merged,
    stda,
)
from domainmerge.errors import Option, UserError
from domainmerge.evaluation.inference import evaluate_model
from domainmerge.evaluation.metrics import ImageStats
from domainmerge.reporting import jsonable
from domainmerge.tensors import normalize
from domainmerge.training import AdaptConfig, Recipe, adapt
from domainmerge.training.init import reset_head

StateDict = dict[str, torch.Tensor]
HEAD = "decode_head."
# Claim 4 measures the dip below the line between the end points (analysis.lmc.dip_below_line):
# the per-domain curves of two targets' models end at very different heights, so the paper's
# barrier (mean of the ends - minimum) is large even for a straight line.
TEXT4 = "interpolation dip below the line: shared init <= 1 mIoU, different init >= 10"

# The demo's training runs all go through domainmerge.training.adapt with small values: whole
# 64x128 images (no resize or crop, flips), batch 8 supervised / 4 per domain self-training,
# AdamW with head lr x10 and the authors' warm-up + poly schedule. Self-training keeps DACS
# (EMA teacher, confidence-weighted pseudo-labels, ClassMix, jitter, blur) and rare-class
# sampling; the ImageNet feature distance and the pseudo-label margins are off (no ImageNet
# model in this world, and the synthetic scenes have no ego-car hood or sky rows to skip). The
# colour jitter runs on half of the iterations (jitter_skip 0.5; the authors' 0.2 gives 80 %), as
# the demo's earlier per-image probability 0.5 did on average.
SUPERVISED = Recipe(name="demo-supervised", uda=False, iters=300, batch_size=8, lr=1e-3, warmup_iters=30,
                    warmup_ratio=0.0, rcs=False)
SELF_TRAINING = Recipe(name="demo-selftraining", iters=300, batch_size=4, lr=6e-4, warmup_iters=30, warmup_ratio=0.0,
                       alpha=0.99, ignore_top=0, ignore_bottom=0, jitter_skip=0.5, fd_lambda=0.0, rcs_temperature=0.1,
                       rcs_min_pixels=0, rcs_min_crop_ratio=0.0)


@dataclass(frozen=True)
class Preset:
    """Sizes and iteration counts of one demo configuration."""

    name: str
    targets: tuple[str, ...] = TARGETS
    size: tuple[int, int] = (64, 128)
    n_pretrain: int = 200
    n_source: int = 300
    n_target: int = 150
    n_val: int = 50
    pretrain: Recipe = SUPERVISED.replace(iters=250, lr=2e-3, warmup_iters=20)
    source: Recipe = SUPERVISED.replace(iters=250, lr=1e-3, warmup_iters=20)
    stda: Recipe = SELF_TRAINING.replace(iters=150, warmup_iters=10)
    lambdas: int = 5
    recal_images: int = 64          # unlabeled target images for the BN-recalibration baseline (uses data)
    combine_all: bool = False       # also a data-combination run over all targets (four-target table)
    arch: str = "tiny_daformer_r"
    # Which checks (claims.ALL_CHECKS ids) this preset's design can resolve; the others print
    # "not tested by this preset". Claims are judged from bootstrap intervals over val images.
    claims: tuple[str, ...] = ALL_CHECKS
    resamples: int = 1000
    level: float = 0.95
    methods: bool = False           # the methods table: every merge method (README, "Merge methods beyond the paper")


PRESETS: dict[str, Preset] = {
    # The pair only (city, idd), 150 adaptation iterations: claims 3 and 5 are about four targets
    # (and 150 iterations leave the models' BN statistics too close together to order the buffer
    # rules), so they are left to the full preset; the two targets keep the run within 2 minutes
    # on a 2-core CPU (one process per core).
    "quick": Preset("quick", targets=("city", "idd"), claims=("1", "2", "4", "world-1", "world-2")),
    "full": Preset("full", n_pretrain=400, n_source=600, n_target=300, n_val=100,
                   pretrain=SUPERVISED.replace(iters=600, lr=2e-3, warmup_iters=40),
                   source=SUPERVISED.replace(iters=600, lr=1e-3, warmup_iters=40),
                   stda=SELF_TRAINING.replace(iters=500, warmup_iters=30), lambdas=11, combine_all=True, methods=True),
    # A miniature of the whole pipeline for the test suite (seconds, meaningless numbers).
    "tiny": Preset("tiny", targets=("city", "night"), size=(32, 64), n_pretrain=8, n_source=8, n_target=8,
                   n_val=4, pretrain=SUPERVISED.replace(iters=2, batch_size=2, warmup_iters=1),
                   source=SUPERVISED.replace(iters=2, batch_size=2, warmup_iters=1),
                   stda=SELF_TRAINING.replace(iters=2, batch_size=2, warmup_iters=1), lambdas=3, resamples=200),
}


def parse_targets(text: str | None, default: Sequence[str]) -> tuple[str, ...]:
    """'city,idd' -> ('city', 'idd'), validated: known targets, no repeats, at least two."""
    if text is None:
        return tuple(default)
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise UserError(Option("targets", text), f": unknown target {unknown[0]!r}; choose from {','.join(TARGETS)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise UserError(Option("targets", text), ": give at least two different targets, e.g. city,idd")
    return names


@dataclass
class TrainRun:
    """What one training run hands back: the student's weights, the trainer's log records and the
    run's wall time."""

    student: StateDict
    records: list[dict[str, Any]]
    seconds: float


def train_run(arch: str, recipe: Recipe, init: StateDict, seed: int, source: SegDataset, target: SegDataset | None,
              desc: str, progress: bool = True) -> TrainRun:
    """One run of the shared trainer in memory (no checkpoint files) from ``init``: whole 64x128
    images (no resize or crop), flipped half of the time. Module-level, so worker processes run it."""
    start = time.perf_counter()
    whole = CropConfig()
    result = adapt(AdaptConfig(source, target, arch=arch, init_state=init, recipe=recipe, seed=seed,
                               source_crop=whole, target_crop=whole, desc=desc, progress=progress),
                   log=print if progress else (lambda _: None))
    return TrainRun(result.student, list(result.records), time.perf_counter() - start)  # already CPU copies


def methods_run(arch: str, seed: int, models: Mapping[str, StateDict], groups: Mapping[str, Sequence[str]],
                val: Mapping[str, SyntheticDataset], images: Mapping[str, torch.Tensor]) -> tuple[MethodsResult, float]:
    """The demo's methods table (``demo.methods.methods_table``) scored on the ``val`` splits, and
    its wall time. Module-level, so a worker process can run it beside the evaluation."""
    from domainmerge.demo.methods import methods_table
    from domainmerge.models import build_model

    start = time.perf_counter()
    torch.manual_seed(seed)
    net = build_model(arch, num_classes=19)

    def score(sd: Mapping[str, torch.Tensor], domains: Sequence[str]) -> dict[str, float]:
        return {d: image_stats(net, sd, val[d]).miou() for d in domains}

    result = methods_table(models, models[SOURCE_ONLY], groups, score, net, images, seed=seed)
    return result, time.perf_counter() - start


def to_checkpoint_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The DA-training layout (:data:`domainmerge.checkpoint.DA_TRAINING`): the student's keys under 'model.'."""
    return DA_TRAINING.wrap(student={k: v.detach() for k, v in state_dict.items()})


def image_stats(model: nn.Module, state_dict: Mapping[str, torch.Tensor], dataset: SyntheticDataset,
                batch_size: int = 50) -> ImageStats:
    """Per-image counts of the network with ``state_dict`` on a labeled split (whole-image
    inference, :func:`domainmerge.evaluation.inference.evaluate_model`), in the split's order:
    the split's mIoU and its bootstrap resamples."""
    model.load_state_dict(state_dict)
    stats = evaluate_model(model, dataset, batch_size=batch_size, workers=0, progress=False, per_image=True).per_image
    assert stats is not None   # per_image=True fills it
    return stats


def evaluate(model: nn.Module, state_dict: Mapping[str, torch.Tensor], dataset: SyntheticDataset,
             batch_size: int = 50) -> float:
    """mIoU (percent) of the network with ``state_dict`` on a labeled split, whole-image inference."""
    return image_stats(model, state_dict, dataset, batch_size).miou()


class Demo:
    """One run of the pipeline; results accumulate in ``self.results`` (a :class:`DemoResults`)."""

    def __init__(self, preset: Preset, out: Path, seed: int = 0,
                 log: Callable[[str], None] = print) -> None:
        self.p, self.out, self.seed, self.log = preset, out, seed, log
        self.results = DemoResults(preset.name, seed, list(preset.targets), jsonable(asdict(preset)))
        self.models: dict[str, StateDict] = {}
        self.stage = 0
        self.t0 = time.perf_counter()

    # -- bookkeeping -------------------------------------------------------------------------
    def _stage(self, text: str) -> float:
        self.stage += 1
        self.log(f"[{self.stage}] {text}  (t={time.perf_counter() - self.t0:.0f}s)")
        return time.perf_counter()

    def _done(self, key: str, start: float) -> None:
        self.results.timings_s[key] = round(time.perf_counter() - start, 2)

    def _new_model(self, seed: int) -> nn.Module:
        from domainmerge.models import build_model

        torch.manual_seed(seed)
        return build_model(self.p.arch, num_classes=19)

    def _save(self, name: str, model_or_sd: nn.Module | Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from domainmerge.checkpoint import save_checkpoint

        sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
        self.models[name] = {k: v.detach().clone() for k, v in sd.items()}
        save_checkpoint(self.out / "checkpoints" / f"{name}.pth", to_checkpoint_keys(sd),
                        meta={"arch": self.p.arch, "name": name, "seed": self.seed, **meta},
                        container="mmseg", force=True)

    # -- stages --------------------------------------------------------------------------------
    def build_world(self) -> None:
        p = self.p
        start = self._stage(f"world: {p.n_pretrain} pretrain, {p.n_source} {SOURCE}, "
                            f"{p.n_target}+{p.n_val} per target ({', '.join(p.targets)}) at {p.size}")
        kw: dict[str, Any] = {"seed": self.seed, "size": p.size}
        self.pretrain_data = SyntheticDataset("pretrain", "train", p.n_pretrain, **kw)
        self.source = SyntheticDataset(SOURCE, "train", p.n_source, **kw)
        self.train = {t: SyntheticDataset(t, "train", p.n_target, **kw) for t in p.targets}
        self.val = {t: SyntheticDataset(t, "val", p.n_val, **kw) for t in p.targets}
        self.results.world = {
            "mean_brightness": {d: round(float(ds.images.float().mean()), 2)
                                for d, ds in [(SOURCE, self.source), *self.val.items()]}}
        self._done("world", start)

    def _fresh(self, seed: int, init: StateDict | None = None) -> StateDict:
        """A network built from ``seed`` (weights from ``init`` when given) with its head
        re-initialised from seed + 1: the start of a source-only run."""
        model = self._new_model(seed)
        if init is not None:
            model.load_state_dict(init)
        reset_head(model, seed + 1)
        return model.state_dict()

    def _launch(self, pool: Pool, name: str, recipe: Recipe, init: StateDict, seed: int, source: SegDataset,
                targets: Sequence[str] = ()) -> Future[TrainRun]:
        """Start one run of the shared trainer on ``pool`` (``targets``: self-training on them)."""
        target = None if not targets else self.train[targets[0]] if len(targets) == 1 else \
            torch.utils.data.ConcatDataset([self.train[t] for t in targets])
        return pool.submit(train_run, self.p.arch, recipe, init, seed, source, target, name, pool.jobs == 1)

    def _collect(self, name: str, future: Future[TrainRun], meta: dict[str, Any], save_as: str | None = None
                 ) -> StateDict:
        """Wait for a run; note its loss summary and time, save its checkpoint (as ``save_as``)."""
        run = future.result()
        records = run.records
        tail = records[-max(1, len(records) // 5):]
        summary: dict[str, Any] = {"loss_first": records[0]["loss_source"],
                                   "source_loss_last": sum(r["loss_source"] for r in tail) / len(tail)}
        if "pseudo_weight" in records[0]:
            summary["pseudo_weight_last"] = sum(r["pseudo_weight"] for r in tail) / len(tail)
        if "targets" in meta:
            summary["targets"] = list(meta["targets"])
        summary["seconds"] = round(run.seconds, 2)
        self.results.training[name] = summary
        self._save(save_as or name, run.student, meta)
        self.log(f"    {name}: done in {run.seconds:.0f} s")
        return run.student

    def training_stages(self, pool: Pool) -> None:
        """Every training run. Runs that do not depend on each other go to the pool together:
        pretraining beside the different-initialisation source-only run, the shared source-only
        run beside the different-initialisation STDA run, then every STDA and data-combination run."""
        p, targets = self.p, self.p.targets
        a, b = targets[:2]
        other = self.seed + 7919         # the different random initialisation (claim 4)
        start = self._stage(f"pretraining on the generic shape task ({p.pretrain.iters} it); beside it, "
                            f"source-only training on {SOURCE} from a different random initialisation")
        pre = self._launch(pool, "pretrain", p.pretrain, self._new_model(self.seed).state_dict(), self.seed,
                           self.pretrain_data)
        d_src = self._launch(pool, SOURCE_ONLY + DIFFINIT, p.source, self._fresh(other), other + 2, self.source)
        self._collect("pretrain", pre, {"stage": "pretrain"}, save_as="pretrained")
        run = self.results.training["pretrain"]
        self.results.pretrain_loss = {"first": run["loss_first"], "last": run["source_loss_last"]}
        self._done("pretraining", start)

        start = self._stage(f"source-only training on {SOURCE} ({p.source.iters} it), the shared start of every "
                            f"adaptation run; beside it, STDA {SOURCE} -> {b} from the different initialisation")
        src = self._launch(pool, SOURCE_ONLY, p.source, self._fresh(self.seed, self.models["pretrained"]),
                           self.seed + 2, self.source)
        d_init = self._collect(SOURCE_ONLY + DIFFINIT, d_src, {"stage": "source-only"})
        d_stda = self._launch(pool, stda(b, DIFFINIT), p.stda, d_init, other + 100, self.source, [b])
        shared = self._collect(SOURCE_ONLY, src, {"stage": "source-only"})
        self._done("source", start)

        runs = [(stda(t), [t], self.seed + 100 + i) for i, t in enumerate(targets)]
        runs.append((combined([a, b]), [a, b], self.seed + 200))
        if p.combine_all and len(targets) > 2:
            runs.append((COMBINED_ALL, list(targets), self.seed + 200))
        start = self._stage(f"{len(targets)} STDA runs (one per target) and {len(runs) - len(targets)} "
                            f"data-combination run(s) from the shared weights ({p.stda.iters} it each, "
                            f"{pool.jobs} process{'es' if pool.jobs > 1 else ''})")
        futures = [(name, ts, self._launch(pool, name, p.stda, shared, seed, self.source, ts))
                   for name, ts, seed in runs]
        self._collect(stda(b, DIFFINIT), d_stda, {"stage": "stda", "targets": [b]})
        for name, ts, future in futures:
            self._collect(name, future, {"stage": "stda", "targets": ts})
        self._done("adaptation", start)

    def _recalibrated(self, net: nn.Module, state_dict: StateDict, targets: Sequence[str]) -> StateDict:
        """``state_dict`` with BN statistics re-estimated (cumulative average) on ``recal_images``
        unlabeled training images spread evenly over ``targets``, in batches of 8."""
        from domainmerge.analysis.recalibrate import recalibrate_bn
        from domainmerge.data.sampling import image_batches, spread_indices

        idx = spread_indices({t: len(self.train[t]) for t in targets}, self.p.recal_images)
        net.load_state_dict(state_dict)
        recalibrate_bn(net, image_batches(self.train, {t: idx[t] for t in targets}, batch_size=8))
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    def evaluate_stage(self) -> None:
        from domainmerge.merging import merge_state_dicts, merge_state_dicts_per_head

        p, targets = self.p, self.p.targets
        a, b = targets[:2]
        start = self._stage("merging and evaluating on every target's val split")
        net = self._new_model(self.seed)
        scores: dict[str, dict[str, float]] = {}
        # Per-image counts of every scored model: the claims' bootstrap intervals come from them.
        self.stats: dict[str, dict[str, ImageStats]] = {}

        def score(name: str, sd: StateDict | Sequence[StateDict], domains: Sequence[str] = targets) -> None:
            """Score ``sd`` (or one state dict per domain: separate heads) on ``domains``."""
            sds = list(sd) if isinstance(sd, Sequence) else [sd] * len(domains)
            self.stats[name] = {d: image_stats(net, m, self.val[d]) for d, m in zip(domains, sds)}
            scores[name] = {d: st.miou() for d, st in self.stats[name].items()}

        for name in [SOURCE_ONLY, *[stda(t) for t in targets], *[n for n in self.models
                                                                 if n.startswith("combined_")]]:
            score(name, self.models[name])
        # Buffer rules and backbone-only merging on the two-target pair and on all targets.
        groups = [(group([a, b]), [a, b])] + ([("all", list(targets))] if len(targets) > 2 else [])
        for label, names in groups:
            sds = [self.models[stda(t)] for t in names]
            by_rule = {rule: merge_state_dicts(sds, buffers=rule) for rule in BUFFER_RULES}
            for rule, sd in by_rule.items():
                score(merged(label, rule), sd)
            # The data-driven baseline the paper avoids: the same parameters, BN statistics
            # re-estimated on unlabeled training images of the merged targets.
            score(merged(label, "recalibrated"), self._recalibrated(net, by_rule["gaussian"], names))
            # 'first' depends on which model comes first: every choice, so the comparison is not an
            # accident of the input order.
            for i, t in enumerate(names[1:], 1):
                score(merged(label, f"first={t}"), merge_state_dicts([sds[i]] + sds[:i] + sds[i + 1:], buffers="first"))
            # Each domain is evaluated with its own model's head (the domain is known at test time).
            score(merged(label, "backbone_heads"), merge_state_dicts_per_head(sds, keep_heads=HEAD), names)
        # Every subset of two or more targets (the four-target table), Gaussian buffers.
        subsets: dict[str, list[str]] = {}
        for k in range(2, len(targets) + 1):
            for combo in itertools.combinations(targets, k):
                key = group(combo)
                subsets[key] = list(combo)
                if k == len(targets) > 2:
                    scores[merged(key, "gaussian")] = scores[merged("all", "gaussian")]
                    self.stats[merged(key, "gaussian")] = self.stats[merged("all", "gaussian")]
                elif merged(key, "gaussian") not in scores:
                    score(merged(key, "gaussian"), merge_state_dicts([self.models[stda(t)] for t in combo]))
        self.results.scores = scores
        self.results.subsets = subsets
        self._done("merge_evaluate", start)

        start = self._stage(f"interpolation curves {a} <-> {b}: shared weights vs different initialisations "
                            f"({p.lambdas} points each)")
        lams = lambda_grid(p.lambdas)
        curves: dict[str, Curve] = {}
        self.curve_stats: dict[str, list[dict[str, ImageStats]]] = {}
        for label, end_b in [("shared_init", stda(b)), ("different_init", stda(b, DIFFINIT))]:
            point_stats: list[dict[str, ImageStats]] = []

            def point_scores(sd: StateDict, point_stats: list[dict[str, ImageStats]] = point_stats
                             ) -> dict[str, float]:
                point_stats.append({d: image_stats(net, sd, self.val[d]) for d in (a, b)})
                return {d: st.miou() for d, st in point_stats[-1].items()}

            # analysis.lmc builds each point with the merge rules and gives H per point, the paper's
            # barrier (mean of the ends - minimum) and the dip below the line between the ends.
            rows = scan([self.models[stda(a)], self.models[end_b]], [(1 - lam, lam) for lam in lams], point_scores)
            summary = barriers(rows)
            self.curve_stats[label] = point_stats
            curves[label] = Curve({d: [r["scores"][d] for r in rows] for d in (a, b)}, [r["H"] for r in rows],
                                  {k: v["barrier"] for k, v in summary.items()},
                                  {k: v["dip_below_line"] for k, v in summary.items()})
        self.results.interpolation = InterpolationCurves(lams, curves)
        self._done("interpolation", start)

    def _method_groups(self) -> dict[str, list[str]]:
        a, b = self.p.targets[:2]
        return {group([a, b]): [a, b], **({"all": list(self.p.targets)} if len(self.p.targets) > 2 else {})}

    def launch_methods(self, pool: Pool) -> Future[tuple[MethodsResult, float]] | None:
        """Start the methods table (every merge method on the pair and on all targets, against the
        source-only base; the data-using ones read ``recal_images`` unlabeled training images per
        target) on ``pool``; None when the preset has no methods table."""
        if not self.p.methods:
            return None
        models = {k: v for k, v in self.models.items() if k == SOURCE_ONLY or k in map(stda, self.p.targets)}
        images = {t: normalize(self.train[t].images[:self.p.recal_images]) for t in self.p.targets}
        return pool.submit(methods_run, self.p.arch, self.seed, models, self._method_groups(), dict(self.val),
                           images)

    def methods_stage(self, future: Future[tuple[MethodsResult, float]] | None) -> None:
        """Collect the methods table and add the rows the evaluation measured (separate heads,
        BN recalibration)."""
        from domainmerge.demo.methods import MethodRow

        if future is None:
            return
        start = self._stage("merge methods: task arithmetic, TIES, DARE, Fisher, AdaMerging (+ knob sweeps)")
        result, seconds = future.result()
        s = self.results.scores
        result.add_rows({g: {"heads": MethodRow("linear, separate heads (domain known)", "linear_heads",
                                                dict(s[merged(g, "backbone_heads")])),
                             "recal": MethodRow(f"linear, BN recalibrated on {self.p.recal_images} images",
                                                "recalibrated", dict(s[merged(g, "recalibrated")]), True)}
                         for g in self._method_groups()})
        self.results.methods = result
        self._done("methods", start)
        self.results.timings_s["methods"] = round(seconds, 2)   # its own time (it may run beside others)

    # -- claims ------------------------------------------------------------------------------
    def checks(self) -> list[Check]:
        """The paper's claims and the world's sanity, each judged from the bootstrap interval (over
        the val images, ``Preset.resamples`` resamples at ``Preset.level``) of its paired
        difference: one :class:`Check` per check (``claims.judged`` / ``claims.not_tested``)."""
        p, s, targets = self.p, self.results.scores, self.p.targets
        a, b = targets[:2]
        pair = group([a, b])
        judge = Judge(self.stats, {t: len(self.val[t]) for t in targets}, resamples=p.resamples, level=p.level,
                      seed=self.seed)
        out: list[Check] = []

        def h(name: str, domains: Sequence[str] = (a, b)) -> Stat:
            return judge.h(name, domains)

        def add(cid: str, text: str, run: Callable[[], Check], kind: str = "claim",
                needs: int = 2) -> None:
            if cid not in p.claims:
                out.append(not_tested(cid, text, kind=kind))
            elif len(targets) < needs:
                out.append(not_tested(cid, text, f"needs {needs} targets, this run has {len(targets)}; give "
                                                 f"{needs} targets (e.g. {','.join(TARGETS[:needs])})", kind))
            else:
                out.append(run())

        def claim1() -> Check:
            pooled, singles = h(merged(pair, "gaussian")), [h(stda(a)), h(stda(b))]
            best = Stat.reduce(singles, "max")
            return judged("1", f"merged H >= best single STDA H + 2 ({pair})",
                          [judge.test("merged - best single", pooled - best, 2.0, ">=")],
                          f"merged {pooled.est:.1f} vs best single {best.est:.1f}")

        def claim2() -> Check:
            pooled, comb = h(merged(pair, "gaussian")), h(combined([a, b]))
            return judged("2", f"merged H >= data-combination H - 1.5 ({pair})",
                          [judge.test("merged - data combination", pooled - comb, -1.5, ">=")],
                          f"merged {pooled.est:.1f} vs data combination {comb.est:.1f}")

        label = "all" if len(targets) > 2 else pair
        doms = list(targets) if label == "all" else [a, b]
        text3 = f"gaussian >= mean >= first-model buffers in H ({'+'.join(doms)})"

        def claim3() -> Check:
            g, m, f = (h(merged(label, r), doms) for r in BUFFER_RULES)
            others = ", ".join(f"{t} {h(merged(label, f'first={t}'), doms).est:.1f}" for t in doms[1:]
                               if merged(label, f"first={t}") in s)
            return judged("3", text3, [judge.test("gaussian - mean", g - m, 0.0, ">="),
                                       judge.test("mean - first", m - f, 0.0, ">=")],
                          f"gaussian {g.est:.1f}, mean {m.est:.1f}, first ({doms[0]}) {f.est:.1f}"
                          + (f"; first with the statistics of {others}" if others else ""))

        def claim4() -> Check:
            assert self.results.interpolation is not None
            lams = self.results.interpolation.lambdas
            shared, diff = (judge.dip_below_line(self.curve_stats[k], lams, (a, b))
                            for k in ("shared_init", "different_init"))
            return judged("4", TEXT4,
                          [judge.test("shared-init dip below line", shared, 1.0, "<="),
                           judge.test("different-init dip below line", diff, 10.0, ">=")],
                          f"shared {shared.est:.2f}, different {diff.est:.2f} (max over {a}, {b} mIoU curves; "
                          "each resample re-scores the whole curve)")

        def claim5() -> Check:
            allh = h(merged("all", "gaussian"), targets)
            singles = {t: h(stda(t), targets) for t in targets}
            best = Stat.reduce(list(singles.values()), "max")
            return judged("5", f"merging all {len(targets)} beats every single STDA model on the {len(targets)}-way H",
                          [judge.test("all merged - best single", allh - best, 0.0, ">")],
                          f"all merged {allh.est:.1f} vs singles "
                          + ", ".join(f"{t} {v.est:.1f}" for t, v in singles.items()))

        def world1() -> Check:
            gains = {t: judge.miou(stda(t), t) - judge.miou(SOURCE_ONLY, t) for t in targets}
            mean = Stat.reduce(list(gains.values()), "mean")
            return judged("world-1", "adaptation gain over source-only >= 5 mIoU on average",
                          [judge.test("mean gain", mean, 5.0, ">=")],
                          ", ".join(f"{t} {v.est:+.1f}" for t, v in gains.items()), kind="sanity")

        def world2() -> Check:
            gaps = {f"{o}->{t}": judge.miou(stda(t), t) - judge.miou(stda(o), t)
                    for t in targets for o in targets if o != t}
            worst = min(gaps, key=lambda k: gaps[k].est)
            return judged("world-2", "a model adapted to another target is worse than the target's own model "
                          "(every pair, mean gap >= 3 mIoU)",
                          [judge.test("smallest gap", Stat.reduce(list(gaps.values()), "min"), 0.0, ">"),
                           judge.test("mean gap", Stat.reduce(list(gaps.values()), "mean"), 3.0, ">=")],
                          f"smallest at {worst} ({gaps[worst].est:.1f})", kind="sanity")

        add("1", f"merged H >= best single STDA H + 2 ({pair})", claim1)
        add("2", f"merged H >= data-combination H - 1.5 ({pair})", claim2)
        add("3", text3, claim3)
        add("4", TEXT4, claim4)
        add("5", "merging all four beats every single STDA model on the 4-way H", claim5, needs=4)
        add("world-1", "adaptation gain over source-only >= 5 mIoU on average", world1, kind="sanity")
        add("world-2", "a model adapted to another target is worse than the target's own model "
            "(every pair, mean gap >= 3 mIoU)", world2, kind="sanity")
        self.results.checks = out
        return out


def run_demo(preset: Preset, out: str | Path, *, seed: int = 0, force: bool = False, jobs: int = 1,
             log: Callable[[str], None] = print) -> DemoResults:
    """Run every stage, write results.json, results.md and the plots to ``out``; return the results
    (the library behind ``domainmerge demo``).

    Args:
        preset: sizes and iteration counts (:data:`PRESETS`, or :func:`preset_with` for other
            targets or networks).
        out: the output folder (created).
        seed: seed of the world, the initialisations and the sampling.
        force: overwrite an existing results.json in ``out``.
        jobs: worker processes that run the independent training runs side by side, and the
            methods table beside the evaluation; the numbers do not depend on it (``demo.jobs``).
        log: called with each progress line and, at the end, each check's verdict.

    Returns:
        The :class:`DemoResults` (``to_dict()`` is results.json): scores per model and target,
        interpolation curves, methods table, the paper's checks.

    Example:
        >>> import contextlib, io, os, tempfile
        >>> from domainmerge import run_demo
        >>> from domainmerge.demo import PRESETS
        >>> folder = tempfile.mkdtemp()
        >>> with contextlib.redirect_stdout(io.StringIO()):   # the stages' progress lines
        ...     results = run_demo(PRESETS["tiny"], folder, log=lambda line: None)
        >>> results.targets, [c.id for c in results.checks][:3]
        (['city', 'night'], ['1', '2', '3'])
        >>> sorted(f for f in os.listdir(folder) if f.startswith("results"))
        ['results.json', 'results.md']
    """
    from domainmerge.demo.report import plot, render_markdown
    from domainmerge.reporting import write_json, write_markdown

    out = Path(out)
    if (out / "results.json").exists() and not force:
        raise UserError(f"{out}/results.json exists; pass ", Option("force", switch=True),
                        " to overwrite the demo's outputs")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    demo = Demo(preset, out, seed, log)
    demo.build_world()
    with Pool(jobs) as pool:
        demo.training_stages(pool)
        beside = pool.jobs > 1          # with workers, the methods table runs beside the evaluation
        methods = demo.launch_methods(pool) if beside else None
        demo.evaluate_stage()
        demo.methods_stage(methods if beside else demo.launch_methods(pool))
    checks = demo.checks()
    demo.results.wall_time_s = round(time.perf_counter() - demo.t0, 1)
    write_json(out / "results.json", demo.results.to_dict())
    write_markdown(out / "results.md", render_markdown(demo.results))
    figures = plot(demo.results, out)
    for c in checks:
        log(format_check(c))
    log(f"wrote {', '.join(str(p) for p in [out / 'results.json', out / 'results.md', *figures])} "
        f"({demo.results.wall_time_s:.0f} s)")
    return demo.results


def preset_with(name: str, targets: str | None = None, arch: str | None = None) -> Preset:
    """A named preset, with ``targets`` ('city,idd') and ``arch`` applied."""
    if name not in PRESETS:
        raise UserError(Option("preset", name), f": unknown; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    return replace(p, targets=parse_targets(targets, p.targets), arch=arch or p.arch)


__all__ = ["PRESETS", "Demo", "Preset", "evaluate", "image_stats", "parse_targets", "preset_with", "run_demo"]
