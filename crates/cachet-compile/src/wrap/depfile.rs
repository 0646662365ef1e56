//! Make-syntax dependency files (`target: prerequisites`), as `gcc -MD`/`-MMD`, clang, nvcc and
//! `rustc --emit=dep-info` write them, and finding the one a command line asks for.

use std::path::{Path, PathBuf};

/// The depfile a gcc-style command line writes, if it asks for one: `-MF FILE` / `-MFFILE` with
/// `-MD`, `-MMD`, `-M` or `-MM`; `-Wp,-MD,FILE` / `-Wp,-MMD,FILE`; or `-MD`/`-MMD` alone with
/// `-o OBJ`, which writes `OBJ` with the extension `.d` (gcc's rule).
pub(crate) fn detect(args: &[String]) -> Option<PathBuf> {
    let mut mf = None;
    let mut wants = false;
    let mut object = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-MF" => mf = it.next().map(PathBuf::from),
            "-MD" | "-MMD" | "-M" | "-MM" => wants = true,
            "-o" => object = it.next().map(PathBuf::from),
            _ => {
                if let Some(path) = arg.strip_prefix("-MF").filter(|p| !p.is_empty()) {
                    mf = Some(PathBuf::from(path));
                } else if let Some(rest) = arg.strip_prefix("-Wp,") {
                    let mut parts = rest.split(',');
                    if let (Some("-MD" | "-MMD"), Some(path)) = (parts.next(), parts.next()) {
                        return Some(PathBuf::from(path));
                    }
                } else if let Some(path) = arg.strip_prefix("-o").filter(|p| !p.is_empty()) {
                    object = Some(PathBuf::from(path));
                }
            }
        }
    }
    if !wants {
        return None;
    }
    mf.or_else(|| object.map(|o| o.with_extension("d")))
}

/// The prerequisites of every rule in `text`, in order and without repeats. Escapes are those
/// gcc writes: `\ ` (a space in a name), `\#`, `$$`; a backslash before a newline continues the
/// line. Lines without a `target:` separator (and comments) are skipped.
pub(crate) fn parse(text: &str) -> Vec<String> {
    let joined = text.replace("\\\r\n", " ").replace("\\\n", " ");
    let mut out: Vec<String> = Vec::new();
    for line in joined.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let mut chars = line.chars().peekable();
        let mut token = String::new();
        let mut after_colon = false;
        let mut tokens = Vec::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' if matches!(chars.peek(), Some(' ' | '#' | '\t')) => {
                    token.extend(chars.next());
                }
                '$' if chars.peek() == Some(&'$') => {
                    chars.next();
                    token.push('$');
                }
                ' ' | '\t' => {
                    if !token.is_empty() {
                        tokens.push(std::mem::take(&mut token));
                    }
                }
                // The rule's separator: a colon followed by whitespace or the end of the line
                // (a Windows drive letter, `C:\`, is not one).
                ':' if !after_colon && chars.peek().is_none_or(|n| n.is_whitespace()) => {
                    token.clear();
                    tokens.clear();
                    after_colon = true;
                }
                _ => token.push(c),
            }
        }
        if !token.is_empty() {
            tokens.push(token);
        }
        if after_colon {
            for token in tokens {
                if !out.contains(&token) {
                    out.push(token);
                }
            }
        }
    }
    out
}

/// Whether `path` is one of `outputs` (or lies in an output folder).
pub(crate) fn is_output(path: &Path, outputs: &[PathBuf]) -> bool {
    outputs.iter().any(|o| path == o || path.starts_with(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn finds_the_depfile_gcc_writes() {
        let cases = [
            ("-c a.c -o a.o -MD -MF deps/a.d", Some("deps/a.d")),
            ("-c a.c -o a.o -MMD -MFdeps/a.d", Some("deps/a.d")),
            ("-c a.c -o build/a.o -MD", Some("build/a.d")),
            ("-c a.c -obuild/a.o -MMD", Some("build/a.d")),
            ("-c a.c -Wp,-MD,x.d -o a.o", Some("x.d")),
            ("-c a.c -o a.o", None),
            ("-c a.c -o a.o -MF a.d", None),
            ("-M a.c -MF a.d", Some("a.d")),
        ];
        for (line, want) in cases {
            assert_eq!(detect(&args(line)), want.map(PathBuf::from), "{line}");
        }
    }

    #[test]
    fn parses_rules_continuations_and_escapes() {
        let text = "build/a.o: src/a.c include/my\\ header.h \\\n  include/b.h\\\r\n include/c$$.h\n\ninclude/b.h:\n# comment: x.h\nother.o: src/a.c C:\\x.h\n";
        assert_eq!(
            parse(text),
            vec![
                "src/a.c",
                "include/my header.h",
                "include/b.h",
                "include/c$.h",
                "C:\\x.h"
            ]
        );
        assert!(parse("no rule here\n").is_empty());
        assert!(parse("").is_empty());
    }
}
