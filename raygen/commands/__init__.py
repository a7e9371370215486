"""The commands of the `raygen` console script, one module per group. Each parses its
arguments, calls one function of the packages and prints through `raygen.render`;
`raygen.cli` wires them into the app and turns raygen's errors into messages."""
