"""The run report: its tables, sections and documents (`tables`, `render`). The `report` stage
(`stages.report`) reads the run directory and writes what `render.render_report` returns."""
