"""The decisions, as pure functions over plain data: the phase logic, the gates that hold or
redirect a decision (queue, group, chain-move layers, convergence), status and conditions,
plans of destinations, the tenant policy, progress and back-off arithmetic. No ``os``, no
``asyncio``, no I/O and no clock (a unit test enforces it): every function here is tested with
values, without fakes."""
