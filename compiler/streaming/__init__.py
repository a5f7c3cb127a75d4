"""Weight-streaming execution: the weights live in a memory service off the wafer and enter
through its edge, layer by layer, while the activations stay in the PEs' SRAM
(`compiler.streaming.linear`)."""
