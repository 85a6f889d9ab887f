# Sourced by the device scripts after they cd to the checkout: unpacks what scripts/device/build.sh
# packed (.device/pack.tar.xz, carried instead of .device to stay within the carry limit), unless
# the binaries are already there; and defines `archive_reports` and `experiment_vars`.
if [ -f .device/pack.tar.xz ] && [ ! -x .device/bin/lipstream ]; then
  tar xJf .device/pack.tar.xz
fi

# archive_reports DIR NAME.tgz: moves everything in DIR but gpu.txt and summary.txt into one
# archive there, since the device returns at most 8 files. DIR is the script's own output folder
# ($OUT, or a folder of its own without it), never a shared one such as /tmp.
archive_reports() {
  local files
  files=$(cd "$1" && ls -d * | grep -v -x -e gpu.txt -e summary.txt -e "$2")
  [ -z "$files" ] || { tar -C "$1" -czf "$1/$2" $files && (cd "$1" && rm -rf $files); }
}

# experiment_vars: the engine's experiment switches (gpu/src/kernels `Experiment`), one variable
# a line, as the binary lists them (`lipstream doctor`), so no script keeps a list of its own.
experiment_vars() {
  ./.device/bin/lipstream doctor 2>/dev/null | sed -n 's/^experiment \(LIPSTREAM_[A-Z0-9_]*\):.*/\1/p'
}
