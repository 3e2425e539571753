"""Client tasks of the fedins family."""
