"""The application: CLI, Python API, batch jobs, distributed launch, inspect. It drives the core
(flexgen_graph), the planner and the runtime; nothing below imports it."""
