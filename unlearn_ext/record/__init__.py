"""Amnesiac bookkeeping (SPEC §2): record each training step's parameter update with its batch's sample
ids, store it compactly (memory or a crash-safe file), and subtract chosen steps' updates later."""
from .encoding import BITMASK, EMPTY, FULL, INDEX, KIND_NAMES
from .recorder import UpdateRecorder
from .store import (DiskStore, DroppedRecords, DroppedRegion, DroppedTail, Manifest, MemoryStore, StoredUpdate,
                    UpdateStore, model_fingerprint, unwrap_model)

__all__ = ["UpdateRecorder", "UpdateStore", "MemoryStore", "DiskStore", "Manifest", "StoredUpdate",
           "DroppedRecords", "DroppedRegion", "DroppedTail", "model_fingerprint", "unwrap_model",
           "EMPTY", "INDEX", "BITMASK", "FULL", "KIND_NAMES"]
