"""The benchmark report behind ``python -m pyfastdl bench`` (docs/benchmarks.md).

``core`` holds the family-independent machinery (timing, machine limits, report writing); each op
family adds its cases in ``pyfastdl/bench/<family>.py`` through a function ``cases(device, quick)``
returning ``core.Case`` objects, with the bytes or flops formula written next to the cases.
"""
