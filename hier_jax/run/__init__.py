"""One run's lifecycle, on any backend: the compiled steps (`hierarchy`, `baselines`), the workers that
hold them (`workers`), the one scheduler (`scheduler`) and its non-barrier checkpoints (`snapshots`),
the driver that resumes and ends a run (`driver`, `result`), where workers live (`backends`: threads
here; `hier_jax.cluster`: Ray), the record and checkpoint schema (`record`, `checkpoint`), both exits'
accuracy (`evaluate`) and the command line of every run (`command`)."""
