"""The planner: cost model, LP, search, schedule, verifier. Its one entry is `planner.compile`."""

from planner.compile import CompileOptions, compile  # noqa: F401  (the entry, re-exported)
