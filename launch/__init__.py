"""Launchers that put the kd_ddp pipeline on a cluster (`python -m launch.slurm`, see docs/slurm.md).

They build the same `kd_ddp.config.Config` as the CLI and torchrun, and every job runs the
same `kd_ddp.cli.run_stage` entry point.
"""
