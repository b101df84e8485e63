"""Do the papers' ablations hold on the digits? Each one over seeds, with its uncertainty.

    python benchmarks/ablations.py                      # the whole page: 3 seeds (about an hour on 1 thread)
    python benchmarks/ablations.py --only calibration   # one group (it trains only the runs that group needs)
    python benchmarks/ablations.py --seeds 0 1 2 3      # one more seed: the finished runs are read back
    python benchmarks/ablations.py --write-docs         # also rewrite the tables and the plot of docs/ablations.md
    python benchmarks/ablations.py --model mobilenetv2_100 --epochs 15 --img-size 32   # the larger setting (GPU)

Every run is a recipe run (``timm_slim.train.recipe`` for S-Net and US-Net,
``timm_slim.dynamic.recipe`` for DS-Net) with the common flags below plus the variant's own; its
folder in ``--output`` is named by the variant, the seed and a hash of its arguments, and a
finished run whose ``results.json`` records exactly these arguments is read back instead of
trained (so an interrupted benchmark continues, and adding a seed trains only that seed). The
BatchNorm calibration ablation trains nothing: it recalibrates each seed's baseline US-Net
several ways. The groups (``--only``):

* ``sandwich``: the sandwich rule (largest + smallest + 2 random) against 4 random widths;
* ``num-widths``: n = 2, 3, 4, 5 widths per step;
* ``distill``: inplace distillation on / off;
* ``calibration``: no calibration (training's running averages) and 32 / 128 / 512 / all 1,437
  training images, exact (cumulative) against running-average (momentum 0.1) statistics;
* ``smallest``: the smallest width 0.25 / 0.35 / 0.5;
* ``snet``: S-Net with switchable (private) BN against one shared BN (the naive supernet of
  ``benchmarks/accuracy.py``), and that shared-BN model calibrated after training;
* ``dsnet``: DS-Net Stage I with and without In-place Ensemble Bootstrapping (static widths);
* ``lr``: the learning rate against n (x1, x1/sqrt(n), x1/n of a single model's 0.08) and
  per-channel gradient normalisation (``--grad-norm per-channel``) at x1;
* ``lr-nodistill``: the same without inplace distillation.

Every gap is a paired difference against the group's reference row over the same seeds:
mean ± standard error of the mean; a gap is marked (bold) only when its 95% t-interval excludes 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import PAPER_DISTILL, PAPER_SCHEDULE, finished_run  # noqa: E402
from docs_section import write_section  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
PAGE = os.path.join(ROOT, 'docs', 'ablations.md')
PLOT = os.path.join(ROOT, 'docs', 'img', 'ablations.png')
MODEL, EPOCHS, IMG_SIZE, SEEDS = 'resnet18', 5, 16, (0, 1, 2)
SINGLE_LR = 0.08   # a single model's learning rate here; the recipe's 0.02 is SINGLE_LR / 4 (n = 4)
CALIB_IMAGES = (32, 128, 512, 1437)   # 1,437: the whole train split (the recipe's 2,000 capped by it)
CALIB_MOMENTUM = 0.1                  # PyTorch's BatchNorm default


@dataclass(frozen=True)
class Variant:
    """One configuration: the recipe and its flags on top of the common ones."""
    key: str
    method: str           # 'usnet', 'snet' or 'dsnet'
    flags: Tuple[str, ...] = ()


@dataclass
class Group:
    title: str
    rows: List[Tuple[str, Variant]]          # (label, variant); the first row is the reference
    note: str = ''
    extra: List[str] = field(default_factory=list)   # labels of rows computed without training


BASE = Variant('usnet', 'usnet')   # US-Net: [0.35, 1], sandwich n=4, inplace distillation, lr 0.02
NO_DISTILL = Variant('nodistill', 'usnet', ('--no-inplace-distill',))


def build_groups() -> Dict[str, Group]:
    """The page's groups, in page order. The first row of each group is its reference."""
    n = 4
    return {
        'sandwich': Group('Sandwich rule against n random widths', [
            ('sandwich rule: 1.0, 0.35 and 2 random', BASE),
            ('4 random widths, no fixed ends', Variant('random4', 'usnet', ('--no-sandwich',)))]),
        'num-widths': Group('Widths per step (n)', [
            ('n = 4 (the paper\'s)', BASE),
            *[(f'n = {k}', Variant(f'n{k}', 'usnet', ('--num-widths', str(k)))) for k in (2, 3, 5)]]),
        'distill': Group('Inplace distillation', [
            ('on (the narrow widths learn the full width\'s soft predictions)', BASE),
            ('off (every width learns from the labels)', NO_DISTILL)]),
        'calibration': Group('BatchNorm calibration: images and statistic', [], note='calibration'),
        'smallest': Group('Smallest width', [
            ('0.35 (the paper\'s)', BASE),
            ('0.25', Variant('low025', 'usnet', ('--width-range', '0.25', '1.0', '--eval-widths', '0.25', '0.35',
                                                 '0.5', '0.75', '1.0'))),
            ('0.5', Variant('low05', 'usnet', ('--width-range', '0.5', '1.0')))]),
        'snet': Group('S-Net: switchable BN against one shared BN', [
            ('switchable BN (private per width)', Variant('snet', 'snet', ('--widths', '0.35', '0.5', '0.75', '1.0'))),
            ('one shared BN, full-width statistics (naive)',
             Variant('naive', 'snet', ('--widths', '0.35', '0.5', '0.75', '1.0', '--bn', 'universal',
                                       '--bn-stats', 'full')))],
            extra=['one shared BN, calibrated after training']),
        'dsnet': Group('DS-Net Stage I: In-place Ensemble Bootstrapping', [
            ('IEB on (EMA teacher, ensemble target for the smallest)', Variant('dsnet', 'dsnet')),
            ('IEB off (every width learns from the labels)',
             Variant('dsnet-noieb', 'dsnet', ('--no-inplace-distill',)))]),
        'lr': Group('Learning rate against n, and per-channel gradient normalisation', [
            (f'x1/n = {SINGLE_LR / n:g} (the recipe\'s default)', BASE),
            (f'x1/sqrt(n) = {SINGLE_LR / math.sqrt(n):g}',
             Variant('lr-sqrt', 'usnet', ('--lr', f'{SINGLE_LR / math.sqrt(n):g}'))),
            (f'x1 = {SINGLE_LR:g}', Variant('lr-x1', 'usnet', ('--lr', f'{SINGLE_LR:g}'))),
            (f'x1 = {SINGLE_LR:g}, per-channel gradient normalisation',
             Variant('lr-x1-gradnorm', 'usnet', ('--lr', f'{SINGLE_LR:g}', '--grad-norm', 'per-channel')))]),
        'lr-nodistill': Group('Learning rate and per-channel normalisation, without inplace distillation', [
            (f'x1/n = {SINGLE_LR / n:g}', NO_DISTILL),
            (f'x1/sqrt(n) = {SINGLE_LR / math.sqrt(n):g}',
             Variant('nd-lr-sqrt', 'usnet', ('--no-inplace-distill', '--lr', f'{SINGLE_LR / math.sqrt(n):g}'))),
            (f'x1 = {SINGLE_LR:g}', Variant('nd-lr-x1', 'usnet', ('--no-inplace-distill', '--lr', f'{SINGLE_LR:g}'))),
            (f'x1 = {SINGLE_LR:g}, per-channel gradient normalisation',
             Variant('nd-lr-x1-gradnorm', 'usnet', ('--no-inplace-distill', '--lr', f'{SINGLE_LR:g}',
                                                     '--grad-norm', 'per-channel')))]),
    }


# The order the groups train in (the page keeps its own): the cheapest and most telling first, DS-Net last.
RUN_ORDER = ['sandwich', 'distill', 'calibration', 'lr', 'snet', 'num-widths', 'smallest', 'dsnet', 'lr-nodistill']


def needs(name: str, group: Group) -> List[Variant]:
    """The trained variants a group's table reads (calibration: the baseline US-Net)."""
    return [BASE] if name == 'calibration' else [v for _, v in group.rows]


# -- runs ---------------------------------------------------------------------------------------
def common_flags(args: argparse.Namespace) -> List[str]:
    flags = ['--model', f'{args.model}_slim', '--img-size', str(args.img_size), '--epochs', str(args.epochs),
             '--eval-interval', str(args.epochs), '--no-progress', '--log-with', 'none', '--checkpoint-hist', '1',
             *PAPER_SCHEDULE]
    return flags + [a for a in args.recipe_args if a != '--']


def variant_argv(variant: Variant, args: argparse.Namespace, seed: int) -> List[str]:
    """The recipe command line of one variant and seed (without ``--output``)."""
    flags = common_flags(args)
    if variant.method == 'dsnet':   # Stage I is the ablation; Stage II as short as the recipe allows
        flags[1] = f'{args.model}_ds'
        flags += ['--target-macs', '0.45', '--gate-epochs', '1', '--route-calib-images', '128']
    if variant.method == 'usnet':   # the paper's rule (a row's own flags may undo it)
        flags += PAPER_DISTILL
    return flags + list(variant.flags) + ['--seed', str(seed)]


def run_folder(variant: Variant, argv: Sequence[str], output: str, seed: int) -> str:
    digest = hashlib.sha1(json.dumps([variant.method, *argv]).encode()).hexdigest()[:8]
    return os.path.join(output, f'{variant.key}-seed{seed}-{digest}')


def train(variant: Variant, args: argparse.Namespace, seed: int) -> dict:
    """One recipe run (or the finished one read back): its top-1 per width, seconds and folder
    (``None`` with ``--no-train`` when it has not finished)."""
    argv = variant_argv(variant, args, seed)
    folder = run_folder(variant, argv, args.output, seed)
    if not args.fresh and not os.path.exists(os.path.join(folder, 'results.json')) and \
            os.path.isdir(os.path.join(folder, 'checkpoints')) and os.listdir(os.path.join(folder, 'checkpoints')):
        argv = argv + ['--resume', folder]   # an interrupted run continues from its last epoch
    if variant.method == 'dsnet':
        from timm_slim.dynamic.recipe import build_dsnet_parser, parse_args, run
        parsed, parser = parse_args(argv + ['--output', folder]), build_dsnet_parser()
    else:
        from timm_slim.train.recipe import build_parser, parse_args, run
        parsed, parser = parse_args(variant.method, argv + ['--output', folder]), build_parser(variant.method)
    results = finished_run(parsed, (lambda _args: None) if args.no_train else run, reuse=not args.fresh,
                           parser=parser)
    if results is None:
        return None
    rows = results['static'] if variant.method == 'dsnet' else results['widths']
    return {'top1': {row['width']: row['top1'] for row in rows}, 'seconds': results['seconds'], 'folder': folder}


# -- the calibration ablation and the calibrated shared-BN S-Net (no training) -----------------
def _loaders(size: int, seed: int, images: int):
    """The recipe's own calibration loader (``images`` training images drawn by ``seed``, the
    evaluation transform) in batches of 32, and its test loader."""
    from accelerate import Accelerator

    from timm_slim.train.recipe import parse_args
    from timm_slim.train.recipe_common import build_data, build_datasets

    options = parse_args('usnet', ['--img-size', str(size), '--seed', str(seed), '--calib-images', str(images),
                                   '--batch-size', '32'])
    accelerator = Accelerator(cpu=True)
    data = build_data(options, build_datasets(options, accelerator), None, accelerator)
    return data.calib, data.val


def _load_trained(folder: str):
    """The supernet a recipe run saved, with the BatchNorm running averages training left."""
    from safetensors.torch import load_file

    import timm_slim
    from timm_slim.train.recipe import RUNNING_STATS

    net = timm_slim.load(os.path.join(folder, 'supernet.safetensors')).eval()
    running = load_file(os.path.join(folder, RUNNING_STATS))
    missing = set(running) - set(net.state_dict())
    if missing:
        raise SystemExit(f'{folder}: running statistics for unknown buffers {sorted(missing)[:3]}')
    net.load_state_dict(running, strict=False)
    return net


class _RunningAverage:
    """Forward pre-hooks that fold each batch's BatchNorm input statistics into a running average
    (momentum 0.1 from mean 0 / variance 1, what a reset BatchNorm in training mode keeps) while
    ``calibrate_bn`` gathers the exact ones from the same batches, normalised the same way."""

    def __init__(self, net) -> None:
        from timm_slim.layers import SlimBatchNorm2d

        self.norms = [m for m in net.modules() if isinstance(m, SlimBatchNorm2d)]
        self.stats: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.norms]

    def _hook(self, module, inputs) -> None:
        x = inputs[0].detach().double()
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)
        old = self.stats.get(id(module))
        if old is None:
            old = (torch.zeros_like(mean), torch.ones_like(var))
        self.stats[id(module)] = tuple((1 - CALIB_MOMENTUM) * o + CALIB_MOMENTUM * b for o, b in zip(old, (mean, var)))

    def store(self) -> None:
        """Replace the active width's exact statistics by the running averages."""
        from timm_slim.layers import UNIVERSAL

        for norm in self.norms:
            mean, var = (t.to(norm.running_mean.dtype) for t in self.stats[id(norm)])
            if norm.kind == UNIVERSAL and not norm.is_full:
                norm.calib.put(norm.width_key, mean, var)
            else:
                with torch.no_grad():
                    norm.running_mean[:mean.numel()].copy_(mean)
                    norm.running_var[:var.numel()].copy_(var)
        self.stats.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def calibration_rows(folder: str, size: int, seed: int, widths: Sequence[float]) -> Dict[str, Dict[float, float]]:
    """Top-1 per width of one trained US-Net under every calibration setting of the page."""
    import timm_slim
    from timm_slim.train import clear_calibrations, evaluate, share_full_width_statistics

    net = _load_trained(folder)
    clear_calibrations(net)
    _, val_loader = _loaders(size, seed, 1)
    share_full_width_statistics(net, [w for w in widths if w != 1.0])
    rows = {'0': {r['width']: r['top1'] for r in evaluate(net, val_loader, widths)}}
    for images in CALIB_IMAGES:
        calib_loader, _ = _loaders(size, seed, images)
        exact, running = {}, {}
        for width in widths:
            hooks = _RunningAverage(net)
            try:
                timm_slim.calibrate_bn(net, calib_loader, widths=[width], num_images=images)
            finally:
                hooks.close()
            exact[width] = evaluate(net, val_loader, [width])[0]['top1']
            with timm_slim.use_width(net, width):
                hooks.store()
            running[width] = evaluate(net, val_loader, [width])[0]['top1']
        rows[f'exact-{images}'], rows[f'running-{images}'] = exact, running
    return rows


def calibrated_shared_bn(folder: str, size: int, seed: int, widths: Sequence[float]) -> Dict[float, float]:
    """Top-1 per width of the naive (shared-BN) S-Net, calibrated per width as a US-Net is."""
    import timm_slim
    from timm_slim.train import clear_calibrations, evaluate

    net = _load_trained(folder)
    clear_calibrations(net)
    calib_loader, val_loader = _loaders(size, seed, CALIB_IMAGES[-1])
    timm_slim.calibrate_bn(net, calib_loader, widths=widths, num_images=CALIB_IMAGES[-1])
    return {r['width']: r['top1'] for r in evaluate(net, val_loader, widths)}


def cached(path: str, key: dict, compute):
    """``compute()``'s value, stored in ``path`` beside the ``key`` that produced it."""
    if os.path.exists(path):
        with open(path) as handle:
            stored = json.load(handle)
        if stored.get('key') == key:
            return {k: {float(w): v for w, v in row.items()} for k, row in stored['value'].items()}
    value = compute()
    from timm_slim.train import write_json
    write_json({'key': key, 'value': value}, path)
    return value


# -- statistics and tables ----------------------------------------------------------------------
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_se(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and standard error of the mean (None with one value)."""
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def paired_gap(values: Sequence[float], reference: Sequence[float]) -> Tuple[float, Optional[float], bool]:
    """Mean paired difference, its standard error, and whether its 95% t-interval excludes 0."""
    diffs = [v - r for v, r in zip(values, reference)]
    mean, se = mean_se(diffs)
    if se is None:
        return mean, None, False
    return mean, se, abs(mean) > _T95.get(len(diffs) - 1, 1.96) * se and se > 0 or (se == 0 and mean != 0)


def _cell(values: Optional[List[float]], reference: Optional[List[float]]) -> str:
    if not values:
        return '—'
    mean, se = mean_se(values)
    text = f'{mean:.1f}' + (f' ± {se:.1f}' if se is not None else '')
    if reference is not None:
        gap, gap_se, beyond = paired_gap(values, reference)
        gap_text = f'{gap:+.1f}' + (f' ± {gap_se:.1f}' if gap_se is not None else '')
        text += f' ({"**" + gap_text + "**" if beyond else gap_text})'
    return text


def group_table(rows: List[Tuple[str, str, Dict[float, List[float]]]], widths: Sequence[float]) -> str:
    """rows: (label, flags, {width: top-1 per seed}); the first is the reference."""
    from timm_slim.train import markdown_table

    reference = rows[0][2]
    out = []
    for index, (label, flags, per_width) in enumerate(rows):
        cells = [label, flags]
        for width in widths:
            values = per_width.get(width)
            ref = reference.get(width) if index > 0 else None
            cells.append(_cell(values, ref if ref and values and len(ref) == len(values) else None))
        out.append(cells)
    return markdown_table(['variant', 'flags', *[f'top-1 @ {w:g}' for w in widths]], out)


def _flags(variant: Variant) -> str:
    recipe = {'usnet': 'usnet.py', 'snet': 'snet.py', 'dsnet': 'dsnet.py'}[variant.method]
    return f'`{recipe} {" ".join(variant.flags)}`'.replace(' `', '`')


def plot(panels: Dict[str, List[Tuple[str, Dict[float, List[float]]]]], path: str, title: str) -> None:
    """One panel per group: mean top-1 against width, error bars one standard error."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    columns = 3
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for label, per_width in lines:
            widths = sorted(per_width)
            stats = [mean_se(per_width[w]) for w in widths]
            ax.errorbar(widths, [m for m, _ in stats], yerr=[s or 0 for _, s in stats], marker='o', capsize=3,
                        label=label[:48])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel('width')
        ax.set_ylabel('top-1 (%)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis('off')
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    groups = build_groups()
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', nargs='+', choices=list(groups), help='these groups only (default: all)')
    parser.add_argument('--seeds', type=int, nargs='+', default=list(SEEDS))
    parser.add_argument('--model', default=MODEL, help='a timm base name with *_slim and *_ds variants')
    parser.add_argument('--epochs', type=int, default=EPOCHS)
    parser.add_argument('--img-size', type=int, default=IMG_SIZE)
    parser.add_argument('--threads', type=int, default=1, help='intra-op threads (1: stable on a shared machine)')
    parser.add_argument('--output', default='output/ablations')
    parser.add_argument('--write-docs', action='store_true', help='rewrite the results sections of docs/ablations.md')
    parser.add_argument('--no-train', action='store_true',
                        help='train nothing: tables from the finished runs, the other groups marked as not run')
    parser.add_argument('--fresh', action='store_true', help='train every run again, even those already in --output')
    parser.add_argument('recipe_args', nargs=argparse.REMAINDER,
                        help='after --: more recipe flags for every run, e.g. -- --train-subset 64 (smoke tests)')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = {name: groups[name] for name in (args.only or groups)}
    started = time.perf_counter()
    runs: Dict[Tuple[Variant, int], dict] = {}
    # Group by group (an interrupted page has whole groups, all seeds), in RUN_ORDER.
    order = [(variant, seed) for name in sorted(chosen, key=RUN_ORDER.index) for seed in args.seeds
             for variant in needs(name, chosen[name])]
    for variant, seed in order:
        if (variant, seed) not in runs:
            runs[variant, seed] = train(variant, args, seed)
            if runs[variant, seed] is None:
                continue
            print(f'{variant.key} seed {seed}: {runs[variant, seed]["seconds"]:.0f} s, top-1 '
                  f'{ {w: round(t, 1) for w, t in runs[variant, seed]["top1"].items()} } '
                  f'({(time.perf_counter() - started) / 60:.1f} min)', flush=True)
    seeds = args.seeds

    def per_width(variant: Variant) -> Dict[float, List[float]]:
        widths = runs[variant, seeds[0]]['top1']
        return {w: [runs[variant, s]['top1'][w] for s in seeds] for w in widths}

    sections: Dict[str, str] = {}
    panels: Dict[str, List[Tuple[str, Dict[float, List[float]]]]] = {}
    missing = {name for name in chosen for variant, seed in order
               if runs.get((variant, seed)) is None and variant in needs(name, chosen[name])}
    runs = {k: v for k, v in runs.items() if v is not None}
    for name, group in chosen.items():
        if name in missing:
            sections[name] = (f'Not run yet: `python benchmarks/ablations.py --only {name} --write-docs` trains '
                              f'its runs (the finished ones are read back).')
            print(f'\n## {group.title}\n\n{sections[name]}')
            continue
        if name == 'calibration':
            eval_widths = sorted(runs[BASE, seeds[0]]['top1'])
            per_seed = [cached(os.path.join(runs[BASE, s]['folder'], 'calibration_ablation.json'),
                               {'images': list(CALIB_IMAGES), 'momentum': CALIB_MOMENTUM, 'seed': s},
                               lambda s=s, w=eval_widths: calibration_rows(runs[BASE, s]['folder'], args.img_size,
                                                                            s, w))
                        for s in seeds]
            order = [(f'exact-{CALIB_IMAGES[-1]}', f'exact, {CALIB_IMAGES[-1]:,} images (the recipe\'s)')]
            order += [('0', 'none: training\'s running averages (full width\'s, sliced)')]
            order += [(f'{kind}-{n}', f'{kind}, {n:,} images') for kind in ('exact', 'running')
                      for n in CALIB_IMAGES if (kind, n) != ('exact', CALIB_IMAGES[-1])]
            lines = [(label, '`calibrate_bn`' if key.startswith('exact') else '—',
                      {w: [rows[key][w] for rows in per_seed] for w in eval_widths}) for key, label in order]
        else:
            lines = [(label, _flags(v), per_width(v)) for label, v in group.rows]
            if group.extra:   # the shared-BN S-Net, calibrated after training
                naive = group.rows[1][1]
                eval_widths = sorted(runs[naive, seeds[0]]['top1'])
                values = [cached(os.path.join(runs[naive, s]['folder'], 'calibrated.json'),
                                 {'images': CALIB_IMAGES[-1], 'seed': s},
                                 lambda s=s, v=naive, w=eval_widths: {'top1': calibrated_shared_bn(
                                     runs[v, s]['folder'], args.img_size, s, w)})['top1'] for s in seeds]
                lines.append((group.extra[0], 'then `calibrate_bn`',
                              {w: [v[w] for v in values] for w in eval_widths}))
        widths = sorted({w for _, _, pw in lines for w in pw})
        sections[name] = group_table(lines, widths)
        panels[group.title] = [(label, pw) for label, _, pw in lines]
        print(f'\n## {group.title}\n\n{sections[name]}')
    minutes = sum(r['seconds'] for r in runs.values()) / 60
    machine = (f'{platform.processor() or platform.machine()}, {args.threads} intra-op thread(s), '
               f'torch {torch.__version__}')
    command = 'python benchmarks/ablations.py' + (' ' + ' '.join(argv if argv is not None else sys.argv[1:])
                                                  if (argv if argv is not None else sys.argv[1:]) else '')
    command = command.replace(' --no-train', '')   # the command that trains what the tables read
    summary = (f'Measured with `{command}`: {args.model} at {args.img_size}x{args.img_size}, {args.epochs} epochs, '
               f'seeds {", ".join(map(str, seeds))}; {len(runs)} recipe runs, {minutes:.0f} minutes of training '
               f'({machine}). Common flags of every run: `{" ".join(common_flags(args))}`.')
    if missing:
        summary += (f' Not run yet: {", ".join(sorted(missing, key=list(chosen).index))}; '
                    f'`{command}` trains them (the finished runs are read back).')
    print(f'\n{summary}')
    if args.write_docs:
        for name, text in sections.items():
            write_section(PAGE, f'<!-- ablations:{name}:begin -->', f'<!-- ablations:{name}:end -->', text)
        write_section(PAGE, '<!-- ablations:summary:begin -->', '<!-- ablations:summary:end -->', summary)
        if args.only is None and len(panels) > 1:
            plot(panels, PLOT, f'{args.model} on digits ({args.img_size}px, {args.epochs} epochs): mean top-1, '
                               f'{len(seeds)} seeds, bars one standard error')
    return 0


if __name__ == '__main__':
    sys.exit(main())
