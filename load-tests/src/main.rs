//! Load generator for credgate. Placeholder until the load-test issue (#5)
//! fills it in: it exists so the workspace layout is final from day one.
fn main() {
    eprintln!("credgate-load-tests: scenarios arrive with issue #5");
    std::process::exit(2);
}
