"""What the speed benchmarks share: fair timing (`timing`), the train steps of both frameworks that
bench_torch times (`steps`), and bench_layers' per-op shapes, variants and record (`shapes`,
`layers`, `layers_report`)."""
