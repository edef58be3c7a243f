"""What people see: plots and the dashboard report."""
