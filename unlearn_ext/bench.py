"""Kernel benchmarks: each unlearn_ext op against the plain-PyTorch way of doing the same job, on the
parameter shapes of torchvision's ResNet-18 and ResNet-50 (on CUDA also ViT-B/16 and one 10^8-element tensor;
random values), at keep ratios 1%, 10%, 50%.

Baselines (what a user writes without the extension):
  layerwise_topk         per-layer loop: torch.topk(|x|.flatten(), k), then gather the signed values
  layerwise_topk (sub)   the same on the materialised update after - before
  layerwise_topk_mask    per-layer loop: torch.topk, then zeros + scatter into a bool mask
  sparse_accumulate_     per-segment loop of dense[l].view(-1).index_add_(0, idx, values, alpha), B=8 updates
  masked_sgd_            SalUn-style: grad.mul_(mask) per layer, then torch.optim.SGD(foreach=True).step()
                         (momentum 0.9, weight decay 5e-4); ours with the masks given, and with the top-k
                         of |grad| selected inside the op; plus the plain SGD step with no mask at all
  masked_adam_           grad.mul_(mask) + torch.optim.AdamW(foreach=True).step()

Medians of `--reps` timed rounds after a warm-up, ours and the baseline run interleaved in the same
rounds (so load from other processes hits both alike), speed-up = baseline median / ours median. On
CUDA also the achieved GB/s of ours against a minimal count of bytes moved (each input read once, each
output written once).

With --markdown X.md every row (each timed round too), the options used, machine facts (threads, load
averages before and after), versions and the git commit go to X.json first, and the page is rendered from
that JSON alone; --report X.json renders it again without measuring.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import torch

from . import build_info, ops, raw_record
from .machine import describe_commit, describe_machine, git_commit, load_averages, machine_facts

RATIOS = (0.01, 0.10, 0.50)
SGD_HP = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
ADAM_HP = dict(lr=1e-3, weight_decay=1e-2)
B_UPDATES = 8
WARMUP = 3  # untimed rounds before the timed ones
#: What a raw record names as its maker: ``--report`` refuses any other.
HARNESS = "unlearn_ext.bench"

#: Not a model: ``tensor<N>`` is one N-element tensor (``tensor1e8``: the single-layer bandwidth case,
#: run on CUDA by default; a small N makes a quick smoke run).
SINGLE_TENSOR = re.compile(r"tensor(\d+(?:e\d+)?)")
CPU_MODELS = ["resnet18", "resnet50"]
CUDA_MODELS = ["resnet18", "resnet50", "vit_b_16", "tensor1e8"]


def model_shapes(name: str):
    single = SINGLE_TENSOR.fullmatch(name)
    if single:
        return [(int(float(single.group(1))),)]
    try:
        import torchvision

        with torch.device("meta"):
            model = getattr(torchvision.models, name)()
        return [tuple(p.shape) for p in model.parameters()]
    except Exception as e:  # pragma: no cover - torchvision is a dependency of the project
        raise SystemExit(f"bench: needs torchvision for the {name} shapes ({e})")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict, device, reps: int) -> dict:
    """Seconds of each fn in each of `reps` rounds after `WARMUP` untimed ones. The fns run interleaved (one of
    each per round, in a rotating order), so load from other processes on a shared machine hits all sides
    alike."""
    names = list(fns)
    for _ in range(WARMUP):
        for name in names:
            fns[name]()
    _sync(device)
    times = {name: [] for name in names}
    for r in range(reps):
        for q in range(len(names)):
            name = names[(q + r) % len(names)]
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


# ---- baselines -------------------------------------------------------------------------------------

def topk_loop(xs, ratio):
    vals, idxs = [], []
    for x in xs:
        flat = x.reshape(-1)
        k = ops.keep_count(flat.numel(), ratio)
        _, i = torch.topk(flat.abs(), k)
        vals.append(flat[i])
        idxs.append(i)
    return vals, idxs


def topk_sub_loop(after, before, ratio):
    return topk_loop([a - b for a, b in zip(after, before)], ratio)


def mask_loop(xs, ratio):
    masks = []
    for x in xs:
        flat = x.reshape(-1)
        k = ops.keep_count(flat.numel(), ratio)
        _, i = torch.topk(flat.abs(), k)
        m = torch.zeros(flat.numel(), dtype=torch.bool, device=x.device)
        m[i] = True
        masks.append(m.view(x.shape))
    return masks


def index_add_loop(dense, values, indices, offsets_list, alpha):
    L = len(dense)
    for s in range(len(offsets_list) - 1):
        lo, hi = offsets_list[s], offsets_list[s + 1]
        dense[s % L].view(-1).index_add_(0, indices[lo:hi], values[lo:hi], alpha=alpha)


# ---- one model, one device --------------------------------------------------------------------------

def bench_model(name, shapes, device, ratios, reps, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    rows = []
    es = torch.empty((), dtype=dtype).element_size()
    xs = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    before = [(x.float() - 1e-3 * torch.randn(x.shape, generator=gen).to(device)).to(dtype) for x in xs]
    n = sum(x.numel() for x in xs)

    rounds = {}  # every timed round (ms) of the measurement the next rows come from, by the name timed

    def timed(fns):
        times = measure(fns, device, reps)
        rounds.clear()
        rounds.update({k: [1e3 * t for t in ts] for k, ts in times.items()})
        return {k: statistics.median(ts) for k, ts in times.items()}

    def row(op, ratio, ours, base, nbytes, baseline, names=("ours", "base")):
        """``names``: the fns of the measurement's rounds that ``ours`` and ``base`` are the medians of."""
        rows.append(dict(model=name, device=str(device), op=op, ratio=ratio, ours_ms=ours * 1e3,
                         base_ms=base * 1e3 if base is not None else None,
                         speedup=(base / ours) if base is not None else None,
                         gbps=(nbytes / ours / 1e9) if device.type == "cuda" else None, baseline=baseline,
                         rounds_ms=dict(rounds), timed=dict(zip(("ours", "base"), names))))
        r = rows[-1]
        base_s = f"{r['base_ms']:9.2f} ms" if base is not None else "        -   "
        sp = f"{r['speedup']:6.2f}x" if base is not None else "     - "
        gb = f"  {r['gbps']:7.1f} GB/s" if r["gbps"] is not None else ""
        print(f"{name:9s} {str(device):5s} {op:34s} r={ratio:5.0%}  ours {r['ours_ms']:9.2f} ms  "
              f"base {base_s}  speed-up {sp}{gb}", flush=True)

    for ratio in ratios:
        k = sum(ops.keep_count(x.numel(), ratio) for x in xs)
        copies = [torch.empty_like(x) for x in xs]
        t = timed({"ours": lambda: ops.layerwise_topk(xs, ratio), "base": lambda: topk_loop(xs, ratio),
                   "copy": lambda: torch._foreach_copy_(copies, xs)})
        ours, base = t["ours"], t["base"]
        row("layerwise_topk", ratio, ours, base, n * es + k * (es + 4), "per-layer torch.topk loop")
        rows[-1]["vs_copy"] = ours / t["copy"]
        del copies

        t = timed({"ours": lambda: ops.layerwise_topk(xs, ratio, subtract=before),
                   "base": lambda: topk_sub_loop(xs, before, ratio)})
        ours, base = t["ours"], t["base"]
        row("layerwise_topk(subtract=)", ratio, ours, base, 2 * n * es + k * (es + 4),
            "materialise after-before, per-layer torch.topk loop")

        t = timed({"ours": lambda: ops.layerwise_topk_mask(xs, ratio), "base": lambda: mask_loop(xs, ratio)})
        ours, base = t["ours"], t["base"]
        row("layerwise_topk_mask", ratio, ours, base, n * es + n, "per-layer torch.topk + scatter")

        # B stored updates applied at once
        upd = [ops.layerwise_topk([torch.randn(x.shape, generator=gen).to(dtype).to(device) for x in xs], ratio)
               for _ in range(B_UPDATES)]
        values = torch.cat([u[0] for u in upd])
        indices = torch.cat([u[1] for u in upd])
        offs = [0]
        for u in upd:
            offs += (u[2][1:].cpu() + offs[-1]).tolist()
        offsets = torch.tensor(offs, dtype=torch.int64, device=device)
        indices_long = indices.long()
        dense = [x.clone() for x in xs]
        t = timed({"ours": lambda: ops.sparse_accumulate_(dense, values, indices, offsets, -1.0),
                   "base": lambda: index_add_loop(dense, values, indices_long, offs, -1.0)})
        ours, base = t["ours"], t["base"]
        row(f"sparse_accumulate_ (B={B_UPDATES})", ratio, ours, base, values.numel() * (es + 4 + 2 * es),
            "per-segment index_add_ loop")

        # masked SGD: ours (masks given / selection inside) vs SalUn-style mask multiply + SGD(foreach)
        grads = [torch.randn(x.shape, generator=gen).to(dtype).to(device) for x in xs]
        masks = ops.layerwise_topk_mask(grads, ratio)
        params = [x.clone() for x in xs]
        bufs = [torch.zeros_like(x) for x in xs]
        tparams = [torch.nn.Parameter(x.clone()) for x in xs]
        opt = torch.optim.SGD(tparams, foreach=True, **SGD_HP)

        def salun_sgd():
            for p, g, m in zip(tparams, grads, masks):
                p.grad.copy_(g).mul_(m)
            opt.step()

        for p, g in zip(tparams, grads):
            p.grad = g.clone()
        opt.step()  # creates the momentum buffers
        t = timed({"base": salun_sgd, "plain": opt.step,
                   "ours": lambda: ops.masked_sgd_(params, grads, bufs, masks, 1.0, **SGD_HP),
                   "ours_sel": lambda: ops.masked_sgd_(params, grads, bufs, None, ratio, **SGD_HP),
                   "base_sel": lambda: (mask_loop(grads, ratio), salun_sgd())})
        base, plain, ours = t["base"], t["plain"], t["ours"]
        row("masked_sgd_ (masks given)", ratio, ours, base, n * (5 * es + 1), "grad*mask + SGD(foreach) step")
        rows[-1]["vs_plain_sgd"] = ours / plain
        row("  plain SGD(foreach) step, no mask", ratio, plain, None, n * 5 * es, "-", names=("plain", None))
        ours, base_sel = t["ours_sel"], t["base_sel"]
        row("masked_sgd_ (top-k of abs(grad) inside)", ratio, ours, base_sel, n * (5 * es) + n * es,
            "per-layer topk mask + grad*mask + SGD(foreach) step", names=("ours_sel", "base_sel"))
        rows[-1]["vs_plain_sgd"] = ours / plain

        m1 = [torch.zeros_like(x) for x in xs]
        m2 = [torch.zeros_like(x) for x in xs]
        aparams = [torch.nn.Parameter(x.clone()) for x in xs]
        aopt = torch.optim.AdamW(aparams, foreach=True, **ADAM_HP)
        for p, g in zip(aparams, grads):
            p.grad = g.clone()
        aopt.step()

        def salun_adam():
            for p, g, m in zip(aparams, grads, masks):
                p.grad.copy_(g).mul_(m)
            aopt.step()

        t = timed({"base": salun_adam,
                   "ours": lambda: ops.masked_adam_(params, grads, m1, m2, masks, 1.0, step=5, **ADAM_HP)})
        ours, base = t["ours"], t["base"]
        row("masked_adam_ (masks given)", ratio, ours, base, n * (7 * es + 1), "grad*mask + AdamW(foreach) step")
        del upd, values, indices, dense, grads, masks, params, bufs, tparams, opt, m1, m2, aparams, aopt
    return rows


# ---- output ---------------------------------------------------------------------------------------------

def report(doc: dict) -> str:
    """The markdown page, from a raw record alone (what ``--report`` reads back)."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    rows = doc["rows"]
    raw = (f"Raw figures (every timed round of every row): `{doc['json']}`; `{doc['prog']} --report "
           f"{doc['json']}` rewrites this page from them." if doc["json"] else "Raw figures not saved.")
    lines = ["# unlearn_ext kernel benchmarks", "",
             f"Measured {doc['finished_utc']} UTC with `{doc['command']}` ({doc['seconds']:.0f} s, "
             f"{describe_commit(doc['git'])}). {raw}", "",
             "## Machine", ""]
    for k, v in doc["machine"].items():
        lines.append(f"- {k}: `{v}`")
    lines.append(f"- loadavg_after: `{doc['loadavg_end']}`")
    lines += ["", "Ours and the baseline run interleaved in the same timed rounds (medians of "
              f"{doc['args']['reps']} rounds after {doc['args']['warmup']} warm-up rounds), so load from other "
              "processes on a shared machine hits both alike; absolute times on a shared VM are noisy, the "
              "ratios much less so. No GPU rows unless torch.cuda.is_available()."]
    lines += ["", "Speed-up = baseline median / ours median, both measured in this run (float32, random values "
              "on the models' parameter shapes). `vs copy` = our top-k / a copy of the same tensors into "
              "preallocated ones (one read and one write of every value: the memory floor of a pass), timed in "
              "the same rounds. A `clone()` is that copy plus first-touch page faults of fresh memory, whose cost "
              "swings with the allocator's state from run to run, so the copy is the stable and the stricter "
              "floor. "
              "`vs plain SGD` = our masked step / an unmasked torch.optim.SGD(foreach) step with the same "
              "momentum and weight decay.", ""]
    gb = any(r["gbps"] is not None for r in rows)
    head = "| model | device | op | ratio | ours (ms) | baseline (ms) | speed-up | vs copy | vs plain SGD |"
    sep = "|---|---|---|---:|---:|---:|---:|---:|---:|"
    if gb:
        head += " GB/s |"
        sep += "---:|"
    lines += [head, sep]
    for r in rows:
        line = (f"| {r['model']} | {r['device']} | {r['op'].strip()} | {r['ratio']:.0%} | {r['ours_ms']:.2f} | "
                f"{fmt(r['base_ms'], '.2f')} | {fmt(r['speedup'], '.2f')}{'x' if r['speedup'] else ''} | "
                f"{fmt(r.get('vs_copy'), '.2f')}{'x' if r.get('vs_copy') else ''} | "
                f"{fmt(r.get('vs_plain_sgd'), '.2f')}{'x' if r.get('vs_plain_sgd') else ''} |")
        if gb:
            line += f" {fmt(r['gbps'], '.1f')} |"
        lines.append(line)
    lines += ["", "Baselines:", ""]
    seen = set()
    for r in rows:
        if r["baseline"] != "-" and r["op"] not in seen:
            seen.add(r["op"])
            lines.append(f"- {r['op'].strip()}: {r['baseline']}")
    lines += ["", "## Targets", ""] + [f"- {t}" for t in doc["targets"]] + [""]
    return "\n".join(lines)


def targets(rows):
    """Each target the rows bear on, met or MISSED (issue 15's list; the per-layer loop speed-up)."""
    out = []
    for r in rows:
        if r["model"] not in ("resnet18", "resnet50"):
            continue
        where = f"[{r['device']}] {r['op'].strip()}, {r['model']}, r={r['ratio']:.0%}"
        if r["op"] == "layerwise_topk" and r["model"] == "resnet18" and abs(r["ratio"] - 0.10) < 1e-9:
            ok = r["speedup"] >= 3.0
            out.append(f"{where}: {r['speedup']:.2f}x the per-layer torch.topk loop (target >= 3x): "
                       f"{'met' if ok else 'MISSED'}")
        if r["op"] == "layerwise_topk" and r.get("vs_copy") is not None and r["ratio"] <= 0.10 + 1e-9:
            ok = r["vs_copy"] <= 1.5
            out.append(f"{where}: {r['vs_copy']:.2f}x a copy of the same tensors (target: <= 1.5x a clone, "
                       f"judged against the copy): {'met' if ok else 'MISSED'}")
        if r["op"].startswith("masked_sgd_") and r.get("vs_plain_sgd") is not None:
            limit = 1.1 if "masks given" in r["op"] else 1.3
            ok = r["vs_plain_sgd"] <= limit
            out.append(f"{where}: {r['vs_plain_sgd']:.2f}x a plain SGD(foreach) step (target <= {limit}x): "
                       f"{'met' if ok else 'MISSED'}")
    return out


def main(argv=None, prog=None):
    """Run the benchmarks with command-line arguments ``argv`` (default: ``sys.argv[1:]``); ``prog`` is
    the command named in ``--help`` and in the markdown report."""
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog=prog, description=" ".join(summary.split()), epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ResNet-18 only, r=10%%, few repetitions")
    parser.add_argument("--markdown", metavar="PATH",
                        help="also write a markdown page with machine facts, and its raw figures beside it (.json)")
    parser.add_argument("--report", metavar="JSON",
                        help="measure nothing: write the page from this raw record (to --markdown, else beside it)")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="where to run (default: the CPU, and CUDA when available)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    parser.add_argument("--models", default=None,
                        help="comma-separated torchvision models and/or tensor<N> (one N-element tensor, e.g. "
                             "tensor1e8) (default: resnet18,resnet50 on the CPU; also vit_b_16 and tensor1e8 on "
                             "CUDA)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.markdown is not None and args.markdown.endswith(".json"):  # the page would overwrite its raw record
        parser.error(f"--markdown: {args.markdown!r} ends in .json; name the page (.md), its raw figures go beside it")
    if args.report:
        raw_record.report(parser, args.report, HARNESS, report, args.markdown)
        print(f"wrote {args.markdown or os.path.splitext(args.report)[0] + '.md'}")
        return 0

    if build_info()["backend"] != "compiled":
        print(f"{parser.prog}: WARNING: compiled kernels not loaded; timing the pure-PyTorch reference", flush=True)
    def models_for(device):
        if args.models:
            return args.models.split(",")
        return ["resnet18"] if args.quick else (CUDA_MODELS if device.type == "cuda" else CPU_MODELS)

    ratios = (0.10,) if args.quick else RATIOS
    reps = args.reps or (5 if args.quick else 7)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{parser.prog}: --device cuda but torch.cuda.is_available() is False")

    doc = {"harness": HARNESS, "prog": parser.prog, "command": " ".join([parser.prog] + argv),
           "json": args.markdown and raw_record.json_beside(args.markdown),
           "args": {"device": args.device, "quick": args.quick, "reps": reps, "warmup": WARMUP,
                    "ratios": list(ratios), "models": {str(d): models_for(d) for d in devices}},
           "started_utc": raw_record.utc_minute(), "machine": machine_facts(),
           "git": git_commit(os.path.dirname(os.path.abspath(__file__)))}
    print(f"{parser.prog}: {describe_machine(doc['machine'])}", flush=True)
    t0 = time.perf_counter()
    rows = []
    for device in devices:
        for name in models_for(device):
            rows += bench_model(name, model_shapes(name), device, ratios, reps)
    doc.update(rows=rows, targets=targets(rows), seconds=time.perf_counter() - t0, loadavg_end=load_averages(),
               finished_utc=raw_record.utc_minute())
    for t in doc["targets"]:
        print(t)
    if args.markdown:  # the raw figures first: the page is rendered from what was written
        raw_record.write_then_page(doc, args.markdown, report)
        print(f"wrote {args.markdown} and {doc['json']}")
    return 0

