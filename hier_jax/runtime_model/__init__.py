"""The runtime model: what each stage costs (`profiler`), what a scheme's training time is from those
costs and a link (`costmodel`), the two conventions of a convolution's flop count (`flops`), which
separation point to choose (`selection`), and the paper's devices modeled from a profile of this
machine (`hardware`)."""
