"""Per-shard against whole-layer top-k (issue 18): what recording under FSDP2 changes in partial amnesiac
unlearning.

    python benchmarks/fsdp_topk.py --seeds 0,1,2 --out benchmarks/results/fsdp_topk.md
    python benchmarks/fsdp_topk.py --report benchmarks/results/fsdp_topk.json   # the page only, from the JSON

Under FSDP2 each rank records the update of its block of every parameter, so ``keep_ratio=r`` keeps the top
⌈r·nˢ⌉ of each block of nˢ entries instead of the top ⌈r·n⌉ of the whole layer. This script trains the
registry's MLP on scikit-learn's digits (8×8, the paper's protocol otherwise: Adam at 1e-3, batch 64) under
FSDP2 on two gloo processes on the CPU; each rank records its blocks' dense update and their partial
update at every r. The unsharded recording of the same run is rebuilt from the dense blocks: put together
they are each step's whole update, whose layer-wise top-k is what an unsharded recorder keeps. For forget
sets of a few random training samples (nested draws), the steps holding one are removed from the final
model with either recording (per-shard: every rank's store applied to the unsharded model) and test
accuracy (TA) and forget-set accuracy (FA) are compared, over training seeds × forget draws.

With ``--out X.md`` the raw rows (every seed, draw, forget set and r; the hyper-parameters used, per-seed
seconds, machine, load averages, versions and the git commit) are written to ``X.json`` first, and the page is
rendered from that JSON alone; ``--report X.json`` renders it again without training.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from unlearn_ext import ops, raw_record
from unlearn_ext.data import load_dataset
from unlearn_ext.machine import describe_commit, describe_machine, git_commit, load_averages, machine_facts
from unlearn_ext.models import make_model
from unlearn_ext.record import DiskStore, Manifest, MemoryStore, UpdateRecorder

RATIOS = (0.01, 0.05, 0.1, 0.2)
BATCH = 64
LR = 1e-3
WORKER_THREADS = 1
#: What a raw file names as its maker: ``--report`` refuses any other.
HARNESS = "benchmarks/fsdp_topk.py"


def _data():
    return load_dataset("digits", normalize=True)


def _model(seed: int):
    torch.manual_seed(seed)
    return make_model("mlp", (1, 8, 8), 10)


def _batches(n: int, epochs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [ids for _ in range(epochs) for ids in torch.randperm(n, generator=g).split(BATCH)]


def _worker(rank: int, tmp: str, seed: int, epochs: int) -> None:
    torch.set_num_threads(WORKER_THREADS)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        train = _data().train
        model = _model(seed)
        mesh = init_device_mesh("cpu", (2,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        recs = [UpdateRecorder(model, store=DiskStore(f"{tmp}/dense-{rank}.ulx"), optimizer=opt)]
        recs += [UpdateRecorder(model, keep_ratio=r, store=DiskStore(f"{tmp}/r{r}-{rank}.ulx"), optimizer=opt)
                 for r in RATIOS]
        for ids in _batches(len(train), epochs, seed):
            mine = ids.chunk(2)[rank] if len(ids) > 1 else ids[:0]
            opt.zero_grad()
            # FSDP2 averages the ranks' gradients: twice each half's share is the whole batch's mean loss
            (F.cross_entropy(model(train.x[mine]), train.y[mine], reduction="sum") * 2 / len(ids)).backward()
            for rec in recs:
                rec.add_ids(mine)
            with recs[0].step(), recs[1].step(), recs[2].step(), recs[3].step(), recs[4].step():
                opt.step()
        for rec in recs:
            rec.store.close()
        final = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(final, f"{tmp}/final.pt")
    finally:
        dist.destroy_process_group()


def _accuracy(model, data) -> float:
    with torch.no_grad():
        return float((model(data.x).argmax(1) == data.y).float().mean())


def _unsharded_stores(dense, model):
    """The whole-layer top-k recording of the same run, rebuilt from the ranks' dense blocks."""
    stores = {r: MemoryStore() for r in RATIOS}
    for r, store in stores.items():
        store.bind(Manifest.from_model(model, r))
    m0 = dense[0].manifest
    for step in dense[0].steps():
        whole = [torch.zeros(s) for s in m0.global_shapes]
        for store in dense:
            (rec,) = store.records([step])
            blocks = [torch.zeros(s) for s in store.manifest.shapes]
            ops.sparse_accumulate_(blocks, rec.values, rec.indices, rec.offsets, 1.0)
            for w, b, shape, block in zip(whole, blocks, store.manifest.shapes, store.manifest.shards.blocks):
                block.view_of(w, shape).copy_(b)
        for r, store in stores.items():
            store.append(step, dense[0].sample_ids(step), *ops.layerwise_topk(whole, r))
    return stores


def _removed(final, stores, steps):
    model = final()
    for store in stores:
        store.apply(model, steps)
    return model


def run_seed(seed: int, epochs: int, sizes, draws: int, tmp: str):
    mp.spawn(_worker, args=(tmp, seed, epochs), nprocs=2, join=True)
    data = _data()
    saved = torch.load(f"{tmp}/final.pt")

    def final():
        model = _model(seed)
        with torch.no_grad():
            for p, w in zip(model.parameters(), saved.values()):
                p.copy_(w)
        return model.eval()

    dense = [DiskStore(f"{tmp}/dense-{rank}.ulx") for rank in (0, 1)]
    per_shard = {r: [DiskStore(f"{tmp}/r{r}-{rank}.ulx") for rank in (0, 1)] for r in RATIOS}
    whole = _unsharded_stores(dense, final())
    rows = []
    ta0 = _accuracy(final(), data.test)
    for draw in range(draws):
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(1000 * seed + draw))
        for n in sizes:
            forget = order[:n]
            steps = dense[0].steps_containing(forget)
            fset = type(data.train)(data.train.x[forget], data.train.y[forget])
            naive = _removed(final, dense, steps)
            theta = torch.cat([p.detach().reshape(-1) for p in final().parameters()])
            for r in RATIOS:
                a, b = _removed(final, per_shard[r], steps), _removed(final, [whole[r]], steps)
                ta, tb = (torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in (a, b))
                rows.append({"seed": seed, "draw": draw, "n": n, "r": r, "forget_ids": forget.tolist(),
                             "steps_undone": len(steps), "steps": len(dense[0]), "undone": len(steps) / len(dense[0]),
                             "TA0": ta0, "TA_dense": _accuracy(naive, data.test), "TA_shard": _accuracy(a, data.test),
                             "TA_whole": _accuracy(b, data.test), "FA_shard": _accuracy(a, fset),
                             "FA_whole": _accuracy(b, fset),
                             "rel": float((ta - tb).norm() / (theta - tb).norm()),
                             "entries_shard": sum(len(s.load_batch(steps)[0]) for s in per_shard[r]),
                             "entries_whole": len(whole[r].load_batch(steps)[0])})
    return rows


def _ms(xs, fmt="{:.3f}") -> str:
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.replace('+', '').format(statistics.stdev(xs))}"


def report(doc: dict) -> str:
    """The page, from a raw record alone (what ``--report`` reads back)."""
    args, hp, rows = doc["args"], doc["hyper_parameters"], doc["rows"]
    ratios, sizes = hp["keep_ratios"], args["sizes"]
    facts, git = doc["machine"], doc["git"]
    raw = (f"Raw rows: `{doc['json']}`; `python {HARNESS} --report {doc['json']}` rewrites this page from them."
           if doc["json"] else "Raw rows not saved (run without --out).")
    lines = ["# Per-shard (FSDP2) against whole-layer top-k in partial amnesiac unlearning", "",
             f"Generated by `{doc['command']}` on {doc['finished_utc']} UTC ({doc['seconds']:.0f} s; "
             f"torch {facts['torch']}).", "",
             f"Machine: {describe_machine(facts)}; ranks at {hp['worker_threads']} thread each. Load average "
             f"(1, 5, 15 min) {facts.get('loadavg', 'unknown')} at the start, {doc['loadavg_end'] or 'unknown'} at "
             f"the end. Code: {describe_commit(git)}. {raw}", "",
             f"Registry MLP (1×8×8 → 512 → 512 → 10, ReLU) on scikit-learn's digits ({doc['data']['train']:,} "
             f"training / {doc['data']['test']} test images, standardised), Adam {hp['lr']:g}, batch {hp['batch']} "
             f"split over {hp['ranks']} FSDP2 ranks ({hp['backend']}, CPU), {args['epochs']} "
             "epochs. Every parameter is sharded on dim 0 in two blocks. *per-shard*: each rank's partial store "
             "(top ⌈r·nˢ⌉ of each block) applied to the unsharded final model; *whole-layer*: the top ⌈r·n⌉ of "
             "each whole-layer update of the same run. Mean ± std over "
             f"{len(args['seeds'])} training seeds × {args['draws']} forget draws; TA of the trained model "
             f"{_ms([r['TA0'] for r in rows if r['r'] == ratios[0] and r['n'] == sizes[0]])}.", "",
             "| forget n | steps undone | r | TA naive (dense) | TA per-shard | TA whole-layer | ΔTA per-shard − "
             "whole | FA per-shard | FA whole-layer | entries per-shard / whole | ‖removed per-shard − whole‖ / "
             "‖removed whole‖ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for r in ratios:
            sel = [x for x in rows if x["n"] == n and x["r"] == r]
            lines.append(f"| {n} | {_ms([x['undone'] for x in sel], '{:.1%}')} | {r:g} | "
                         f"{_ms([x['TA_dense'] for x in sel])} | {_ms([x['TA_shard'] for x in sel])} | "
                         f"{_ms([x['TA_whole'] for x in sel])} | "
                         f"{_ms([x['TA_shard'] - x['TA_whole'] for x in sel], '{:+.4f}')} | "
                         f"{_ms([x['FA_shard'] for x in sel])} | {_ms([x['FA_whole'] for x in sel])} | "
                         f"{statistics.mean(x['entries_shard'] / max(1, x['entries_whole']) for x in sel):.4f} | "
                         f"{_ms([x['rel'] for x in sel])} |")
    diffs = [abs(x["TA_shard"] - x["TA_whole"]) for x in rows]
    lines += ["", f"Largest |ΔTA| over all {len(rows)} (seed, draw, n, r) rows: {max(diffs):.4f} "
                  f"({round(max(diffs) * doc['data']['test'])} test images); "
                  f"{sum(d == 0 for d in diffs)} rows have the same TA both ways."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--sizes", default="2,8,32", help="forget-set sizes, comma-separated")
    ap.add_argument("--draws", type=int, default=3, help="forget-set draws per training seed")
    ap.add_argument("--out", default=None, help="the page (.md); the raw rows go beside it (.json)")
    ap.add_argument("--report", metavar="JSON", default=None,
                    help="train nothing: write the page from this raw record (beside it, or to --out)")
    args = ap.parse_args(argv)
    out = raw_record.page_path(ap, args.out)
    if args.report:
        raw_record.report(ap, args.report, HARNESS, report, out)
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    command = (f"python {HARNESS} --seeds {args.seeds} --epochs {args.epochs} --sizes {args.sizes} "
               f"--draws {args.draws}" + (f" --out {out}" if out else ""))
    data = _data()
    doc = {"harness": HARNESS, "command": command, "json": out and raw_record.json_beside(out),
           "args": {"seeds": seeds, "epochs": args.epochs, "sizes": sizes, "draws": args.draws},
           "hyper_parameters": {"model": "mlp", "dataset": "digits", "normalize": True, "optimizer": "Adam",
                                "lr": LR, "batch": BATCH, "ranks": 2, "backend": "gloo",
                                "worker_threads": WORKER_THREADS, "keep_ratios": list(RATIOS),
                                "forget_draw_seed": "1000 * seed + draw"},
           "data": {"train": len(data.train), "test": len(data.test)},
           "machine": machine_facts(), "git": git_commit(os.path.dirname(os.path.abspath(__file__))),
           "seeds": [], "rows": []}
    t0 = time.perf_counter()
    for seed in seeds:
        t_seed = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            rows = run_seed(seed, args.epochs, sizes, args.draws, tmp)
        doc["rows"] += rows
        doc["seeds"].append({"seed": seed, "seconds": time.perf_counter() - t_seed, "steps": rows[0]["steps"],
                             "TA0": rows[0]["TA0"]})
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    doc.update(seconds=time.perf_counter() - t0, loadavg_end=load_averages(),
               finished_utc=raw_record.utc_minute())
    print(raw_record.write_then_page(doc, out, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
