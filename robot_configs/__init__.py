"""The robot configs zk0 ships (``zk0.robot_configs``): package data, found with
``zk0.shared.config.robot_config_path`` by name (``sim_so101``) wherever zk0 is installed."""
