"""Jobs of every kind (merges, trainings): one store, one dispatcher, one manager.

The parts every kind shares: the job record (:mod:`.models`), the store (:mod:`.store`,
:mod:`.sqlite_store`), the dispatcher and its worker pools (:mod:`.dispatcher`,
:mod:`.worker_pool`, :mod:`.standby`), the manager (:mod:`.system`, :mod:`.manager`),
cancellation, pausing and the restart rule. What a kind adds, and how to add one, is in
:mod:`service.jobs.kinds`.
"""
