"""What crosses a process boundary: the messages, the transport (pickled calls, out-of-band arrays in shared memory) and arrays shared by reference."""
