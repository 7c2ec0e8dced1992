"""Async inference on the arm: a control loop at the robot's rate fed by a policy worker,
adapters hot-swapped between chunks, torch or ONNX Runtime (``zk0-agent eval`` runs it).

==================  ==========================================================================
``action_queue``    timestamped action queue and LeRobot's four aggregate functions
``engine``          control loop + policy worker thread, async and sync modes
``metrics``         chunk records, per-tick queue depth, starved and missed ticks
``swap``            adapter versions merged off the control path, swapped by reference
``backends``        torch and ONNX Runtime chunk predictors, one interface
``onnx_export``     the chunk as two ONNX graphs, exported once per base, cached
``realtime``        the arm driven one control step per wall-clock tick
``frames``          robot dictionaries <-> policy tensors
``evaluation``      closed-loop episodes, report, queue-depth plot
==================  ==========================================================================

Wiring to adapter distribution (``zk0.agent.distribution``)::

    subscriber = AdapterSubscriber.from_config(agent, on_new_version=engine.offer_adapter)
    engine.on_version_in_use = subscriber.set_in_use
"""
