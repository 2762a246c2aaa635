# Shared by the launch scripts: print every command, run it unless DRY_RUN is set.
#
# Quoting rule: every value a user gives (CONFIG, WORKDIR, extra flags, ...) reaches the program
# as exactly one argument, whatever it contains (spaces, ; $(...) ` ' " && * ~). Locally that
# is "$@"; for a command string another shell parses (gcloud ... ssh --command=...), build the
# string with quote_words, never by pasting "$VAR" into it.

# dry_run: true when DRY_RUN is set to anything but empty or 0 (DRY_RUN=1, DRY_RUN=yes).
dry_run() { [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]; }

# quote_words WORD...: the words joined into one string that any POSIX shell (bash, dash, sh)
# splits back into exactly these words, expanding nothing. Plain words stay as they are;
# the others are put in single quotes ('it'\''s' for it's).
quote_words() {
  local out=() word sq="'" esc="'\\''"
  for word in "$@"; do
    if [[ -n "$word" && "$word" != *[!A-Za-z0-9_./:=@%+,-]* && "$word" != =* ]]; then
      out+=("$word")
    else
      out+=("'${word//"$sq"/"$esc"}'")
    fi
  done
  local IFS=' '
  printf '%s' "${out[*]-}"
}

# show CMD ARG...: print the command as `+ cmd args` (quoted as quote_words does).
show() { printf '+ %s\n' "$(quote_words "$@")"; }

# run CMD ARG...: show the command, then run it unless DRY_RUN is set.
run() {
  show "$@"
  if ! dry_run; then "$@"; fi
}

# require_int NAME...: exit 2 unless each named variable holds a non-negative integer (they
# go into bash arithmetic and into flags, where anything else would be evaluated or misread).
require_int() {
  local name
  for name in "$@"; do
    if [[ ! "${!name}" =~ ^[0-9]+$ ]]; then
      echo "error: $name must be a whole number, not '${!name}'" >&2
      exit 2
    fi
  done
}
