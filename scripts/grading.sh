# Sourced by the grading scripts (grade_full.sh, grade_strong.sh, time_to_target_search.sh): one
# evaluation per run and attack, written beside the run and kept, so that re-running continues.
# Needs $data (the dataset directory).
grade() {  # grade RUN ATTACK FILE: psadv eval RUN --attack ATTACK into RUN/FILE, unless it is there
  [ -s "$1/$3" ] || { psadv eval "$1" --attack "$2" --json --no-progress --data-dir "$data" --threads 2 > "$1/$3.part"
                      mv "$1/$3.part" "$1/$3"; }
}
field() { python -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$@"; }  # field FILE KEY
