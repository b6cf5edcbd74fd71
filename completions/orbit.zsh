
#compdef orbit

_orbit_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _ORBIT_COMPLETE=complete_zsh orbit)
}

compdef _orbit_completion orbit

