"""lcserve.deploy: hardware profiles, the capacity planner and its renderings."""
