pytest_plugins = ["tests.fixtures.s3_server", "tests.fixtures.slurm_cluster", "tests.fixtures.mlflow_server", "tests.fixtures.process_group"]
