"""The paper's grid as a library: its profiles and cells (`profiles`), one cell's training and the
grid's rows (`cells`), the modeled runtime of each row (`runtime`), the report and its figures
(`report`, `figures`), and the run of a whole grid (`grid`). `experiments.paper` is its command."""
