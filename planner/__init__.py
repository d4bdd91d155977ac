"""Planning: catalogs, the cost model, the scheduler, rescheduling, the simulator, and shared state.

Kept import-light: the gateway imports ``planner.plan`` and ``planner.state`` and must not pay for
the search code (numpy, highspy) or anything heavier.
"""
