"""The quantization run: the layer loop (:mod:`~bpdq.engine.loop`), its stages (:mod:`~bpdq.engine.stages`),
the activation container, model sources and checkpoint sinks, resume, and the communicator of a distributed
run. Import what you need from the submodules; this package imports nothing itself."""
