"""What every tool of the project shares and the model does not need: atomic file writes and the file lock
(`common.fileio`), and the number types and exit statuses of the command lines (`common.args`,
`common.exit_codes`)."""
