"""Algorithm 1 of Gogineni & Nadimi: amnesiac and partial amnesiac unlearning (docs/algorithms.md#partial-amnesiac).

During training an :class:`~unlearn_ext.record.UpdateRecorder` (``NaiveAmnesiac.recorder(model)``,
``PartialAmnesiac.recorder(model, keep_ratio=r)``) stores each step's update Δ_b with the ids S_b of its
batch — dense for naive amnesiac (``keep_ratio=None``), layer-wise top-k pruned Δ̂_b
(``keep_ratio=r``) for partial amnesiac. Unlearning D_f is then

    B_f = {b : S_b ∩ D_f ≠ ∅},    θ ← θ − Σ_{b ∈ B_f} Δ̂_b,

all of B_f applied by one ``store.apply(model, B_f, alpha=-1)`` — one batched ``sparse_accumulate_``
call (the store splits it only past its memory bound). Only parameters are recorded, so BatchNorm
running statistics are left as trained.

* ``amnesiac`` (naive): dense updates, followed by a brief fine-tune on D_r (``finetune=True``, default;
  ``epochs`` 1 of the training recipe at ``lr``) — the paper reports it both ways. When no stored step
  holds a forget sample (B_f = ∅) nothing is removed and the fine-tune is skipped too: the model is
  returned unchanged.
* ``partial_amnesiac``: pruned updates and **no fine-tune** (the paper's headline claim;
  ``finetune=False`` by default, available as an option for comparison).
* Option of both, off by default: ``repair=True`` replaces the fine-tune (whatever ``finetune`` says) by a
  calibrated repair — up to ``repair_epochs`` epochs of the same recipe on D_r at ``lr``, forget accuracy
  checked before every step (``repair_every_step``; else before every epoch) — that ends at the most-repaired
  state whose forget accuracy is still at most ``repair_target`` (``ForgetAccuracyStop.repair``): the undo
  forgets, the repair gives back utility until forgetting would be lost. When the undo alone left forget
  accuracy above the target no checked state is within it and the repair runs to its end (``forget_acc`` says
  so). The target has its own name, not ``stop_forget_acc``: the experiment runner calibrates a method whose
  defaults hold ``stop_forget_acc`` and ``epochs`` (its learning-rate grid and step budget), which would change
  the plain rows; the caller passes the target (e.g. the forgetting target of docs/protocol.md).

Which store a method reads decides naive vs partial; the method itself does not re-check the ratio
(``stats["store_keep_ratio"]`` reports it). Statistics: ``steps_removed`` |B_f|, ``steps_total``,
``fraction_steps_affected`` |B_f| / steps, ``entries_applied``, ``bytes_read`` (the decoded
values + int32 indices + int64 offsets handed to ``sparse_accumulate_``), ``bytes_stored`` and
``dense_equivalent_bytes`` of the whole store; with ``repair``, ``finetune_steps`` (up to the state kept),
``steps_run``, ``forget_acc`` and ``target_forget_acc`` (:func:`~unlearn_ext.methods.common.run_epochs`).
"""
from __future__ import annotations

from ..base import Method, register_method
from ..common import ForgetAccuracyStop, finetune, sample_ids
from ..hparams import AT_LEAST_ONE, UNIT


@register_method
class NaiveAmnesiac(Method):
    """Amnesiac unlearning with dense stored updates. Hyper-parameters: ``finetune`` (True), ``epochs``
    (1) and ``lr`` (1e-3) of that fine-tune on D_r, ``train_config`` (its optimizer recipe; None →
    ``TrainConfig()``, Adam); the calibrated repair (module docstring): ``repair`` (False), ``repair_target``
    (an accuracy in [0, 1], needed with ``repair``), ``repair_epochs`` (1), ``repair_every_step`` (True)."""

    name = "amnesiac"
    needs_store = True
    defaults = {"finetune": True, "epochs": 1, "lr": 1e-3, "train_config": None,
                "repair": False, "repair_target": None, "repair_epochs": 1, "repair_every_step": True}
    ranges = {"repair_target": UNIT, "repair_epochs": AT_LEAST_ONE}
    record_keep_ratio = None  # dense: NaiveAmnesiac.recorder(model) (see Method.recorder)
    uses_model_lr = True  # the fine-tune is FT's recipe for one epoch

    def _run(self, model, forget, retain, store, hp):
        if hp["repair"]:
            if hp["repair_target"] is None:
                raise ValueError(f"{self.name}: repair=True needs repair_target= (the forget accuracy, in [0, 1], "
                                 "the repair must not rise past)")
            if retain is None:
                raise ValueError(f"{self.name}: repair=True needs retain= (the repair trains on D_r)")
        elif hp["repair_target"] is not None:
            raise ValueError(f"{self.name}: repair_target is read only with repair=True (pass repair=True, or no "
                             "repair_target)")
        elif hp["finetune"] and retain is None:
            raise ValueError(f"{self.name}: finetune=True needs retain= (or pass finetune=False)")
        if len(store) == 0:
            raise ValueError(f"{self.name}: the store holds no recorded training steps (was the model trained "
                             "for 0 epochs, or the recorder not passed to train()?): there is nothing to undo")
        ids = sample_ids(self.name, "forget", forget)
        missing = store.ids_not_recorded(ids)
        if missing.numel():
            raise ValueError(f"{self.name}: {missing.numel()} forget id(s) appear in no recorded training step, "
                             f"e.g. {missing[:5].tolist()}: not training samples of this store's run (or "
                             "outside its only_ids), so their influence cannot be removed")
        steps = store.steps_containing(ids)
        applied = store.apply(model, steps, alpha=-1.0)
        manifest = store.manifest
        num_layers = len(manifest.names)
        value_bytes = manifest.torch_value_dtype.itemsize
        total = len(store)
        stats = {"steps_removed": len(steps), "steps_total": total,
                 "fraction_steps_affected": len(steps) / total if total else 0.0,
                 "entries_applied": applied["entries"], "apply_calls": applied["calls"],
                 "bytes_read": applied["entries"] * (value_bytes + 4) + 8 * (len(steps) * num_layers + 1),
                 "bytes_stored": store.nbytes(), "dense_equivalent_bytes": store.dense_equivalent_nbytes(),
                 "store_keep_ratio": manifest.keep_ratio, "finetuned": bool(hp["finetune"] and steps)}
        if hp["repair"]:  # in place of the fine-tune
            stats.update(finetuned=False, repaired=bool(steps))
            if steps:
                stop = ForgetAccuracyStop(forget, hp["repair_target"], repair=True)
                stats.update(finetune(model, retain, hp["train_config"], hp["repair_epochs"], hp["lr"], stop=stop,
                                      stop_every_step=hp["repair_every_step"]))
        elif hp["finetune"] and steps:
            stats.update(finetune(model, retain, hp["train_config"], hp["epochs"], hp["lr"]))
        return stats


@register_method
class PartialAmnesiac(NaiveAmnesiac):
    """Partial amnesiac unlearning: removal of the layer-wise pruned updates, no fine-tune by default.
    Same hyper-parameters as :class:`NaiveAmnesiac`; the keep ratio r is the recording's
    (``PartialAmnesiac.recorder(model, keep_ratio=r)``, default 0.1; the paper sweeps
    {0.01, 0.05, 0.1, 0.2, 0.5})."""

    name = "partial_amnesiac"
    defaults = {**NaiveAmnesiac.defaults, "finetune": False}
    record_keep_ratio = 0.1
