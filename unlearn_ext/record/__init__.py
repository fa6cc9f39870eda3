"""Amnesiac bookkeeping (docs/store-format.md): record each training step's parameter update with its batch's sample
ids, store it compactly (memory or a crash-safe file), and subtract chosen steps' updates later.

One job a module: :mod:`.recorder` (the training-loop wrapper), :mod:`.identity` (which model a store
belongs to), :mod:`.sharding` (which block of each parameter a rank records under FSDP2),
:mod:`.validation` (what an append is given), :mod:`.encoding` (a layer's smallest encoding),
:mod:`.store` (the store API and MemoryStore), :mod:`.disk_format` (the file's bytes and how a damaged
file is read back), :mod:`.disk_store` (DiskStore: creation, writer thread, close) and :mod:`.planner`
(the bytes a recording will take, before training)."""
from .disk_format import DroppedRecords, DroppedRegion
from .disk_store import DiskStore
from .encoding import BITMASK, EMPTY, FULL, INDEX, KIND_NAMES
from .identity import Manifest, model_fingerprint, unwrap_model
from .planner import StoragePlan, plan_storage
from .recorder import UpdateRecorder
from .store import MemoryStore, StoredUpdate, UpdateStore

__all__ = ["UpdateRecorder", "UpdateStore", "MemoryStore", "DiskStore", "Manifest", "StoredUpdate",
           "DroppedRecords", "DroppedRegion", "model_fingerprint", "unwrap_model", "StoragePlan", "plan_storage",
           "EMPTY", "INDEX", "BITMASK", "FULL", "KIND_NAMES"]
