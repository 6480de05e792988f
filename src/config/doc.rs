//! docs/configuration.md is the long `--help` text, generated from the
//! same clap definition the binary parses with, so the page cannot drift
//! from the options. `config_doc_matches_the_help_text` fails when it has;
//! `scripts/config-doc` writes it again.

use super::Cli;
use clap::{Command, CommandFactory};
use std::path::Path;

/// The page's path, from the crate root.
const PAGE: &str = "docs/configuration.md";
/// Columns the help is wrapped at: fixed, so the page does not depend on
/// the terminal of whoever generates it (clap's `wrap_help` would
/// otherwise measure it, or read COLUMNS).
const WIDTH: usize = 100;
/// Set to 1 to write the page instead of comparing it.
const UPDATE_VARIABLE: &str = "NAMESHIM_UPDATE_CONFIG_DOC";

/// What the page says before the help text.
const INTRO: &str = "\
# Configuration

<!-- Generated from the option definitions in src/config.rs by
scripts/config-doc. Do not edit: a unit test fails when this page
differs from the help text. -->

Every option of nameshim, exactly as `nameshim --help` prints it (wrapped
here at 100 columns). Each option can also be set by the environment
variable shown with it (`[env: ...]`); an option on the command line wins
over the variable. Durations take `ms`, `s` or `m` (a bare number is
seconds); byte counts take `K`, `M` or `G` (powers of 1024). Addresses are
numeric only ([install.md](install.md)).

Where each option matters: [limits.md](limits.md) (every bound),
[security.md](security.md) (`--server-source-addr`),
[clients.md](clients.md) (`--advertise-port`),
[troubleshooting.md](troubleshooting.md) (`--ca-listen`, `--pva-listen`),
[wrapper.md](wrapper.md) (`--grace`, `--signal-group`),
[observability.md](observability.md) (`--log-format`, `--no-http`).

```text
";

/// The command as the page shows it: fixed width, and environment
/// variables named without the values this process happens to have.
fn documented_command() -> Command {
    fn settle(cmd: Command) -> Command {
        cmd.term_width(WIDTH)
            .mut_args(|arg| arg.hide_env_values(true))
            .mut_subcommands(settle)
    }
    let mut cmd = settle(Cli::command());
    cmd.build();
    cmd
}

/// The help text as plain text, without the spaces clap leaves at the
/// ends of lines.
fn plain_help(cmd: &mut Command) -> String {
    let text = cmd.render_long_help().to_string();
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    lines.join("\n").trim_end().to_string()
}

/// The whole page: `nameshim --help`, then `nameshim SUBCOMMAND --help`
/// for each subcommand.
pub fn configuration_page() -> String {
    let mut cmd = documented_command();
    let mut page = String::from(INTRO);
    page.push_str(&plain_help(&mut cmd));
    page.push_str("\n```\n");
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|sub| sub.get_name().to_string())
        .filter(|name| name != "help")
        .collect();
    for name in names {
        if let Some(sub) = cmd.find_subcommand_mut(&name) {
            page.push_str(&format!("\n## nameshim {name}\n\n```text\n"));
            page.push_str(&plain_help(sub));
            page.push_str("\n```\n");
        }
    }
    page
}

#[test]
fn config_doc_matches_the_help_text() {
    let page_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(PAGE);
    let expected = configuration_page();
    if std::env::var(UPDATE_VARIABLE).is_ok_and(|v| v == "1") {
        if let Err(e) = std::fs::write(&page_path, &expected) {
            panic!("cannot write {}: {e}", page_path.display());
        }
        return;
    }
    let found = std::fs::read_to_string(&page_path).unwrap_or_default();
    if found != expected {
        let first_difference = found
            .lines()
            .zip(expected.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| found.lines().count().min(expected.lines().count()));
        panic!(
            "{PAGE} differs from the --help text (first at line {}).\n\
             Regenerate it with: scripts/config-doc\n\
             (that is: {UPDATE_VARIABLE}=1 cargo test config_doc_matches_the_help_text)",
            first_difference + 1
        );
    }
}

#[test]
fn config_doc_help_is_wrapped_and_names_variables_without_values() {
    // The page must come out the same on any terminal and in any
    // environment: a value this process has for a variable is not shown.
    let help = plain_help(&mut documented_command());
    assert!(help.contains("[env: NAMESHIM_LISTEN]"));
    assert!(!help.contains("[env: NAMESHIM_LISTEN="));
    assert!(help.lines().all(|line| line.chars().count() <= WIDTH));
}
