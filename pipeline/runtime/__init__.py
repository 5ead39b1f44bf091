"""What every part uses and that uses none of them: devices, the cluster client, atomic writes, pause points."""
