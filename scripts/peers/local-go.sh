# Sourced by the peer scripts that build Go programs.
# local_go MIN: prints the machine's Go (on PATH, else /usr/local/go) when it is MIN or later;
# fails otherwise.
local_go() {
  local min=$1 candidate have
  for candidate in "$(command -v go 2>/dev/null)" /usr/local/go/bin/go; do
    [[ -x $candidate ]] || continue
    have=$("$candidate" env GOVERSION 2>/dev/null | sed 's/^go//')
    if [[ -n $have && $(printf '%s\n%s\n' "$min" "$have" | sort -V | head -n 1) == "$min" ]]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
