"""Async inference on the arm: a control loop at the robot's rate fed by a policy worker,
adapters hot-swapped between chunks, torch or ONNX Runtime (``zk0-agent eval`` runs it).

==================  ==========================================================================
``action_queue``    timestamped action queue and LeRobot's four aggregate functions
``engine``          control loop + policy worker thread, async and sync modes
``metrics``         chunk records, per-tick queue depth, starved and missed ticks
``swap``            adapter versions merged off the control path, swapped by reference
``backends``        torch and ONNX Runtime chunk predictors, one interface
``onnx_graphs``     the chunk as two ONNX graphs: signature, export
``onnx_export``     those graphs exported once per base, cached, in a child process
``realtime``        the arm driven one control step per wall-clock tick
``frames``          robot dictionaries <-> policy tensors
``evaluation``      closed-loop episodes, report, queue-depth plot
==================  ==========================================================================

Wiring to adapter distribution (``zk0.agent.distribution``). The engine alone tells which
version is in use: the one that computed its last chunk (a version swapped in between episodes
is put to use at once by a probe chunk on the last frame, without reading the arm)::

    subscriber = AdapterSubscriber.from_config(agent, on_new_version=engine.offer_adapter)
    engine.on_version_in_use = subscriber.set_in_use
"""
