# Shared by the launch scripts (sourced, not run).

die() { echo "error: $*" >&2; exit 2; }

# Quotes one word for a POSIX shell: as it is when harmless, else in single quotes.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Prints a command, each word quoted, on one line.
show() {
  local words=() w
  for w in "$@"; do words+=("$(quote "$w")"); done
  echo "${words[*]}"
}
