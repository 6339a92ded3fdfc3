"""What puts the pipeline into production: worker unit, cloud-init, IAM policy, pool set-up."""
