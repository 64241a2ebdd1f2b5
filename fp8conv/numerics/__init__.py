"""Pure numpy numerics, no I/O: the quantization kernels (the reference), the microscaled formats'
kernels, the scale observers, the scale rules and the error statistics."""
