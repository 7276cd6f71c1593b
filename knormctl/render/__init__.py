"""Tables, exports and figures built from stored rows (never imports the engine).

Where each thing lives:
  metrics   every metric defined once (column, unit, direction, aggregation, change unit)
  paired    the statistics of one metric: value, paired change, 95% intervals, verdict
  rows      one row per configuration; the run's timing-noise estimate
  tasks     question-task accuracy (per subtask x length, means, near chance), needle cells
  header    the run(s) and every machine they ran on
  flags     every rule that raises an honesty flag
  summary   build_summary(): the Summary that everything below reads
  compare   two runs side by side
  format    numbers as text (shared by tables, markdown, figures)
  export    json / csv / markdown;  tables: rich;  figures/: matplotlib
Import the submodule you need: rich and matplotlib are loaded only by the modules that draw.
"""
