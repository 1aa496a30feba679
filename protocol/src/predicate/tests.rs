//! Parsing, type checking, evaluation and serde of the rule language, through its public API.

use super::*;

/// A profile for tests: tiers bronze < silver < gold.
#[derive(Default)]
struct TestProfile {
    numbers: Vec<(NumberField, Decimal)>,
    tier: Option<usize>,
    attributes: Vec<(&'static str, Value)>,
    tags: Vec<&'static str>,
    channels: Vec<&'static str>,
    identities: Vec<&'static str>,
    days: Vec<(TimeField, i64)>,
}

const TIERS: [&str; 3] = ["bronze", "silver", "gold"];

impl PredicateContext for TestProfile {
    fn number(&self, field: NumberField) -> Option<Decimal> {
        self.numbers
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, n)| *n)
    }
    fn tier_level(&self) -> Option<usize> {
        self.tier
    }
    fn tier_level_of(&self, name: &str) -> Option<usize> {
        TIERS.iter().position(|tier| *tier == name)
    }
    fn attribute(&self, name: &str) -> Option<Value> {
        self.attributes
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    }
    fn has_tag(&self, tag: &str) -> bool {
        self.tags.contains(&tag)
    }
    fn has_channel(&self, channel: &str) -> bool {
        self.channels.contains(&channel)
    }
    fn has_identity(&self, kind: &str) -> bool {
        self.identities.contains(&kind)
    }
    fn days_since(&self, field: &TimeField) -> Option<i64> {
        self.days.iter().find(|(f, _)| f == field).map(|(_, d)| *d)
    }
}

fn dec(text: &str) -> Decimal {
    Decimal::from_str_exact(text).unwrap()
}

fn parse(source: &str) -> Predicate {
    Predicate::parse(source).unwrap_or_else(|e| panic!("{source:?} should parse: {e}"))
}

fn eval(source: &str, profile: &TestProfile) -> bool {
    parse(source).eval(profile)
}

/// (line, column, message) of the error parsing `source`.
fn error(source: &str) -> (u32, u32, String) {
    match Predicate::parse(source) {
        Ok(_) => panic!("{source:?} should not parse"),
        Err(e) => (e.line, e.column, e.message),
    }
}

fn err(line: u32, column: u32, message: &str) -> (u32, u32, String) {
    (line, column, message.to_owned())
}

fn tagged(tags: &[&'static str]) -> TestProfile {
    TestProfile {
        tags: tags.to_vec(),
        ..TestProfile::default()
    }
}

/// What `predicate` answers on a profile tagged "a" and on one without tags.
fn with_and_without_a(predicate: &Predicate) -> (bool, bool) {
    (
        predicate.eval(&tagged(&["a"])),
        predicate.eval(&tagged(&[])),
    )
}

#[test]
fn every_operator_on_every_number_field() {
    let fields = [
        ("points", NumberField::Points),
        ("spend_365d", NumberField::Spend365d),
        ("total_spend", NumberField::TotalSpend),
        ("order_count", NumberField::OrderCount),
    ];
    // (operator, expected for literal 99, for 100, for 101) with the field at 100.
    let table = [
        ("==", false, true, false),
        ("!=", true, false, true),
        ("<", false, false, true),
        ("<=", false, true, true),
        (">", true, false, false),
        (">=", true, true, false),
    ];
    for (name, field) in fields {
        let profile = TestProfile {
            numbers: vec![(field, dec("100"))],
            ..TestProfile::default()
        };
        let unset = TestProfile::default();
        for (op, below, equal, above) in table {
            for (literal, expected) in [("99", below), ("100", equal), ("101", above)] {
                let source = format!("{name} {op} {literal}");
                assert_eq!(eval(&source, &profile), expected, "{source}");
                // An unset field makes every comparison false, `!=` included.
                assert!(!eval(&source, &unset), "{source} on an unset field");
            }
        }
    }
}

#[test]
fn decimal_literals_are_exact() {
    let profile = TestProfile {
        numbers: vec![
            (NumberField::Spend365d, dec("1000.50")),
            (
                NumberField::TotalSpend,
                dec("1234567890123456789.123456789"),
            ),
            (NumberField::Points, dec("-3")),
        ],
        ..TestProfile::default()
    };
    assert!(eval("spend_365d >= 1000.50", &profile));
    assert!(
        eval("spend_365d == 1000.5", &profile),
        "scale doesn't matter"
    );
    assert!(!eval("spend_365d >= 1000.51", &profile));
    assert!(eval("spend_365d > 1000.49", &profile));
    // Needs more precision than an f64 has.
    assert!(eval(
        "total_spend == 1234567890123456789.123456789",
        &profile
    ));
    assert!(!eval(
        "total_spend == 1234567890123456789.123456788",
        &profile
    ));
    assert!(eval("points == -3", &profile));
    assert!(eval("points < -2.99", &profile));
    assert!(eval("points>-4", &profile), "no spaces needed");
}

#[test]
fn tiers_order_by_level() {
    let silver = TestProfile {
        tier: Some(1),
        ..TestProfile::default()
    };
    let cases = [
        ("tier == \"silver\"", true),
        ("tier != \"silver\"", false),
        ("tier != \"gold\"", true),
        ("tier < \"gold\"", true),
        ("tier <= \"silver\"", true),
        ("tier > \"bronze\"", true),
        ("tier >= \"gold\"", false),
        ("tier > \"silver\"", false),
        ("tier in (\"gold\", \"silver\")", true),
        ("tier in (\"gold\", \"bronze\")", false),
        // Unknown tier names are missing values: false with every operator.
        ("tier >= \"platinum\"", false),
        ("tier < \"platinum\"", false),
        ("tier != \"platinum\"", false),
        ("not tier == \"platinum\"", true),
    ];
    for (source, expected) in cases {
        assert_eq!(eval(source, &silver), expected, "{source}");
    }
    let no_tier = TestProfile::default();
    assert!(!eval("tier == \"bronze\"", &no_tier));
    assert!(!eval("tier != \"bronze\"", &no_tier));
    assert!(!eval("tier >= \"bronze\"", &no_tier));
}

#[test]
fn attributes_compare_by_type() {
    let profile = TestProfile {
        attributes: vec![
            ("city", Value::String("Paris".into())),
            ("age", Value::Number(dec("31"))),
            ("vip", Value::Bool(true)),
            ("code", Value::String("B".into())),
            ("quote", Value::String("say \"hi\" \\ ok".into())),
            ("zip", Value::String("02139".into())),
        ],
        ..TestProfile::default()
    };
    let cases = [
        ("attr.city == \"Paris\"", true),
        ("attr.city != \"Paris\"", false),
        ("attr.city != \"Lyon\"", true),
        ("attr.city == \"paris\"", false),
        // Byte-wise: "B" (0x42) < "a" (0x61); "é" (0xC3..) > "z".
        ("attr.code < \"a\"", true),
        ("attr.code > \"A\"", true),
        ("attr.code >= \"B\"", true),
        ("attr.code <= \"A\"", false),
        ("attr.city < \"é\"", true),
        ("attr.age == 31", true),
        ("attr.age == 31.0", true),
        ("attr.age >= 18", true),
        ("attr.age < 18", false),
        ("attr.vip == true", true),
        ("attr.vip != false", true),
        ("attr.vip == false", false),
        // Booleans have no order.
        ("attr.vip > false", false),
        ("attr.vip >= true", false),
        ("attr.vip <= true", false),
        // Different types: false, `!=` included.
        ("attr.age == \"31\"", false),
        ("attr.age != \"31\"", false),
        ("attr.zip == 2139", false),
        ("attr.zip != 2139", false),
        ("attr.city == true", false),
        ("attr.vip != 1", false),
        // Missing: false both ways, and `not` negates plainly.
        ("attr.country == \"FR\"", false),
        ("attr.country != \"FR\"", false),
        ("attr.country < \"FR\"", false),
        ("not attr.country == \"FR\"", true),
        ("not (attr.country != \"FR\")", true),
        ("attr.quote == \"say \\\"hi\\\" \\\\ ok\"", true),
        ("attr.city in (\"Lyon\", \"Paris\")", true),
        ("attr.city in (\"Lyon\", 3, true)", false),
        ("attr.age in (\"31\", 31)", true),
        ("attr.country in (\"FR\")", false),
        ("not (attr.country in (\"FR\"))", true),
    ];
    for (source, expected) in cases {
        assert_eq!(eval(source, &profile), expected, "{source}");
    }
}

#[test]
fn in_lists_on_number_fields() {
    let profile = TestProfile {
        numbers: vec![(NumberField::OrderCount, dec("3"))],
        ..TestProfile::default()
    };
    assert!(eval("order_count in (1, 2, 3)", &profile));
    assert!(eval("order_count in (3.00)", &profile));
    assert!(!eval("order_count in (1, 2)", &profile));
    assert!(!eval("points in (0)", &profile), "unset field");
    let list = vec!["1"; PREDICATE_IN_VALUES_MAX].join(",");
    assert!(!eval(&format!("order_count in ({list})"), &profile));
}

#[test]
fn days_since_compares_whole_days() {
    let profile = TestProfile {
        days: vec![
            (TimeField::LastOrderAt, 30),
            (TimeField::CreatedAt, 400),
            (TimeField::LastSeen("douyin".into()), 3),
            (TimeField::LastOrderOn("tmall".into()), 45),
        ],
        ..TestProfile::default()
    };
    let cases = [
        ("days_since(last_order_at) >= 30", true),
        ("days_since(last_order_at) > 30", false),
        ("days_since(last_order_at) == 30", true),
        ("days_since(last_order_at) < 31", true),
        ("days_since(last_order_at) > 29.5", true),
        ("days_since(created_at) >= 365", true),
        ("days_since( created_at ) in (400, 401)", true),
        ("days_since(last_seen(\"douyin\")) <= 7", true),
        ("days_since(last_seen(\"douyin\")) > 3", false),
        ("days_since(last_seen(\"wechat\")) >= 0", false),
        ("days_since(last_order_on(\"tmall\")) == 45", true),
        ("days_since(last_order_on(\"douyin\")) < 1000", false),
        // No first order recorded: false whatever the operator.
        ("days_since(first_order_at) > 3", false),
        ("days_since(first_order_at) <= 3", false),
        ("days_since(first_order_at) != 3", false),
        ("not days_since(first_order_at) > 3", true),
    ];
    for (source, expected) in cases {
        assert_eq!(eval(source, &profile), expected, "{source}");
    }
}

#[test]
fn calls_read_tags_channels_and_identities() {
    let profile = TestProfile {
        tags: vec!["vip"],
        channels: vec!["wechat"],
        identities: vec!["phone"],
        ..TestProfile::default()
    };
    let cases = [
        ("has_tag(\"vip\")", true),
        ("has_tag(\"VIP\")", false),
        ("has_tag(\"churned\")", false),
        ("channel(\"wechat\")", true),
        ("channel(\"email\")", false),
        ("has_identity(\"phone\")", true),
        ("has_identity(\"email\")", false),
        ("not has_identity(\"email\")", true),
    ];
    for (source, expected) in cases {
        assert_eq!(eval(source, &profile), expected, "{source}");
    }
}

#[test]
fn precedence_and_parentheses() {
    let (a, b, c) = ("has_tag(\"a\")", "has_tag(\"b\")", "has_tag(\"c\")");
    // `a or b and c` is `a or (b and c)`: true with only a, where `(a or b) and c` is false.
    assert!(eval(&format!("{a} or {b} and {c}"), &tagged(&["a"])));
    assert!(!eval(&format!("({a} or {b}) and {c}"), &tagged(&["a"])));
    assert!(!eval(&format!("{a} and {b} or {c}"), &tagged(&["a"])));
    assert!(eval(&format!("{a} and ({b} or {c})"), &tagged(&["a", "c"])));
    assert!(eval(&format!("{c} or {a} and {b}"), &tagged(&["c"])));
    // `not` binds tighter than `and`: `(not a) and b`, false with nothing set, where
    // `not (a and b)` is true.
    assert!(!eval(&format!("not {a} and {b}"), &tagged(&[])));
    assert!(eval(&format!("not ({a} and {b})"), &tagged(&[])));
    assert!(eval(&format!("not not {a}"), &tagged(&["a"])));
    assert!(eval(&format!("((({a})))"), &tagged(&["a"])));
    // Whitespace and newlines are free.
    assert!(eval(&format!("\n\t{a}\r\n  or\n{b}  "), &tagged(&["b"])));
    assert!(eval("has_tag(\"a\")or(has_tag(\"b\"))", &tagged(&["b"])));
}

#[test]
#[allow(clippy::too_many_lines)]
fn parse_errors_point_at_the_token() {
    let cases = [
        ("pointz > 1", err(1, 1, "unknown field \"pointz\"")),
        ("has_tag(\"a\" and x", err(1, 13, "expected \")\" but found \"and\"")),
        (
            "tier == 3",
            err(1, 9, "tier compares with a tier name (a string), found a number"),
        ),
        (
            "tier in (\"gold\", true)",
            err(1, 18, "tier compares with a tier name (a string), found a boolean"),
        ),
        ("points == \"100\"", err(1, 11, "points compares with a number, found a string")),
        (
            "days_since(created_at) > true",
            err(1, 26, "days_since(created_at) compares with a number, found a boolean"),
        ),
        ("has_tag(\"abc", err(1, 9, "unterminated string")),
        ("has_tag(\"abc\n\")", err(1, 9, "unterminated string")),
        (
            "points >",
            err(1, 9, "unexpected end of input, expected a value (a number, a string, true or false)"),
        ),
        ("", err(1, 1, "unexpected end of input, expected a condition")),
        ("  \n ", err(2, 2, "unexpected end of input, expected a condition")),
        ("(points > 1", err(1, 12, "unexpected end of input, expected \")\"")),
        ("points > 1)", err(1, 11, "expected \"and\", \"or\" or end of input but found \")\"")),
        ("points > 1 points", err(1, 12, "expected \"and\", \"or\" or end of input but found \"points\"")),
        ("points 1", err(1, 8, "expected a comparison operator or \"in\" but found number 1")),
        ("and points > 1", err(1, 1, "expected a condition but found \"and\"")),
        ("points > 1 AND points < 3", err(1, 12, "expected \"and\", \"or\" or end of input but found \"AND\"")),
        ("points > and", err(1, 10, "expected a value (a number, a string, true or false) but found \"and\"")),
        ("points = 1", err(1, 8, "unexpected character \"=\" (compare with \"==\")")),
        ("!has_tag(\"a\")", err(1, 1, "unexpected character \"!\" (negate with \"not\")")),
        ("has_tag(\"a\") && has_tag(\"b\")", err(1, 14, "unexpected character \"&\" (use \"and\")")),
        ("points > 1 # x", err(1, 12, "unexpected character \"#\"")),
        ("points in ()", err(1, 12, "an \"in\" list needs at least one value")),
        ("points in (1,)", err(1, 14, "expected a value (a number, a string, true or false) but found \")\"")),
        ("points in (1 2)", err(1, 14, "expected \",\" or \")\" but found number 2")),
        ("points in 1", err(1, 11, "expected \"(\" but found number 1")),
        ("has_tag(vip)", err(1, 9, "expected a string but found \"vip\"")),
        ("has_tag \"vip\"", err(1, 9, "expected \"(\" but found string \"vip\"")),
        (
            "days_since(birthday) > 1",
            err(1, 12, "unknown time field \"birthday\" (expected last_order_at, first_order_at, created_at, last_seen(\"CHANNEL\") or last_order_on(\"CHANNEL\"))"),
        ),
        (
            "days_since(\"created_at\") > 1",
            err(1, 12, "expected a time field (last_order_at, first_order_at, created_at, last_seen(\"CHANNEL\") or last_order_on(\"CHANNEL\")) but found string \"created_at\""),
        ),
        ("days_since > 1", err(1, 12, "expected \"(\" but found \">\"")),
        ("days_since(last_seen(douyin)) > 1", err(1, 22, "expected a string but found \"douyin\"")),
        ("days_since(last_seen(\"douyin\") > 1", err(1, 32, "expected \")\" but found \">\"")),
        ("attr.City == 1", err(1, 1, "invalid attribute name \"City\" (1 to 64 of a-z, 0-9 and _)")),
        ("attr. == 1", err(1, 1, "expected an attribute name after \"attr.\"")),
        ("attr == 1", err(1, 1, "expected \"attr.\" followed by an attribute name")),
        ("points > 12abc", err(1, 10, "invalid number \"12abc\"")),
        ("points > 1.2.3", err(1, 10, "invalid number \"1.2.3\"")),
        ("points > 1.", err(1, 10, "invalid number \"1.\"")),
        ("points > .5", err(1, 10, "unexpected character \".\"")),
        ("points > - 5", err(1, 10, "unexpected character \"-\"")),
        (
            "points > 123456789012345678901234567890",
            err(1, 10, "number 123456789012345678901234567890 is out of range (at most 28 significant digits)"),
        ),
        (
            "has_tag(\"a\\n\")",
            err(1, 11, "invalid escape \"\\n\" in string (only \\\" and \\\\ are allowed)"),
        ),
        ("true", err(1, 1, "expected a condition but found \"true\"")),
        ("not", err(1, 4, "unexpected end of input, expected a condition")),
    ];
    for (source, expected) in cases {
        assert_eq!(error(source), expected, "{source:?}");
    }
}

#[test]
fn parse_errors_on_later_lines_and_after_wide_chars() {
    assert_eq!(
        error("has_tag(\"a\")\n  and pointz > 3"),
        err(2, 7, "unknown field \"pointz\"")
    );
    assert_eq!(
        error("points > 1\r\nor\r\n   tier == 2"),
        err(
            3,
            12,
            "tier compares with a tier name (a string), found a number"
        )
    );
    assert_eq!(
        error("has_tag(\"a\") or\n\n has_tag(\"b\n\")"),
        err(3, 10, "unterminated string")
    );
    // Columns count characters, not bytes: "é" and "会员" are one column each.
    assert_eq!(
        error("has_tag(\"é会员\") and pointz > 1"),
        err(1, 20, "unknown field \"pointz\"")
    );
    let e = Predicate::parse("has_tag(\"a\")\n  and pointz > 3").unwrap_err();
    assert_eq!(e.to_string(), "line 2, column 7: unknown field \"pointz\"");
}

#[test]
fn the_first_error_in_source_order_wins() {
    // The unknown field comes before the unterminated string.
    assert_eq!(
        error("pointz > 1 or has_tag(\"x"),
        err(1, 1, "unknown field \"pointz\"")
    );
    // The type error comes before the bad character right after it.
    assert_eq!(
        error("tier == 1 @"),
        err(
            1,
            9,
            "tier compares with a tier name (a string), found a number"
        )
    );
}

#[test]
fn attribute_names() {
    let name = "a".repeat(64);
    let profile = TestProfile::default();
    assert!(!eval(&format!("attr.{name} == 1"), &profile));
    assert!(!eval("attr.1st_order_sku == \"x\"", &profile));
    let long = "a".repeat(65);
    assert_eq!(
        error(&format!("points > 1 or attr.{long} == 1")),
        err(
            1,
            15,
            &format!("invalid attribute name \"{long}\" (1 to 64 of a-z, 0-9 and _)")
        )
    );
    assert_eq!(
        error("attr.città == 1"),
        err(
            1,
            1,
            "invalid attribute name \"città\" (1 to 64 of a-z, 0-9 and _)"
        )
    );
}

#[test]
fn in_lists_hold_at_most_256_values() {
    // 256 different values: every one is kept, the last as much as the first.
    let full: Vec<String> = (1..=PREDICATE_IN_VALUES_MAX)
        .map(|n| n.to_string())
        .collect();
    let full = parse(&format!("points in ({})", full.join(",")));
    assert_eq!(full.reads(), Reads::POINTS);
    let points = |n: &str| TestProfile {
        numbers: vec![(NumberField::Points, dec(n))],
        ..TestProfile::default()
    };
    assert_eq!(
        ["1", "256", "0", "257"].map(|n| full.eval(&points(n))),
        [true, true, false, false]
    );
    // "points in (" is 11 characters, each "1," two more: the 257th value is at 11 + 2 * 256 + 1.
    let too_many = vec!["1"; PREDICATE_IN_VALUES_MAX + 1].join(",");
    assert_eq!(
        error(&format!("points in ({too_many})")),
        err(1, 524, "an \"in\" list holds at most 256 values")
    );
}

#[test]
fn nesting_is_bounded() {
    let a = "has_tag(\"a\")";
    let nested = |levels: usize| format!("{}{a}{}", "(".repeat(levels), ")".repeat(levels));
    assert!(parse(&nested(PREDICATE_DEPTH_MAX)).eval(&tagged(&["a"])));
    let message = "nesting is deeper than the limit of 32 levels";
    assert_eq!(error(&nested(PREDICATE_DEPTH_MAX + 1)), err(1, 33, message));
    // Hostile input: thousands of "(" error out instead of overflowing the stack.
    assert_eq!(error(&"(".repeat(4000)), err(1, 33, message));
    // `not` nests too.
    let nots = |levels: usize| format!("{}{a}", "not ".repeat(levels));
    assert!(
        parse(&nots(PREDICATE_DEPTH_MAX)).eval(&tagged(&["a"])),
        "even number of nots"
    );
    assert_eq!(error(&nots(PREDICATE_DEPTH_MAX + 1)), err(1, 129, message));
    assert_eq!(error(&"not ".repeat(1000)), err(1, 129, message));
    // Mixed (16 nots, an even number, and 16 groups: 32 levels), and levels are released when
    // a group closes.
    let mixed = format!("{} {a}{}", "not (".repeat(16), ")".repeat(16));
    assert_eq!(with_and_without_a(&parse(&mixed)), (true, false));
    let siblings = vec![nested(PREDICATE_DEPTH_MAX); 3].join(" and ");
    assert_eq!(with_and_without_a(&parse(&siblings)), (true, false));
    // Long flat chains are not nesting.
    let chain = vec![a; 200].join(" or ");
    assert!(parse(&chain).eval(&tagged(&["a"])));
}

#[test]
fn source_size_is_bounded() {
    let a = "has_tag(\"a\")";
    let padded = format!("{a}{}", " ".repeat(PREDICATE_SOURCE_BYTES_MAX - a.len()));
    assert_eq!(padded.len(), PREDICATE_SOURCE_BYTES_MAX);
    let at_the_limit = parse(&padded);
    assert_eq!(at_the_limit.source(), padded, "kept whole, spaces and all");
    assert_eq!(with_and_without_a(&at_the_limit), (true, false));
    let over = format!("{padded} ");
    assert_eq!(
        error(&over),
        err(
            1,
            1,
            "predicate is 4097 bytes long, more than the limit of 4096 bytes"
        )
    );
    // Checked before anything else.
    assert_eq!(
        error(&"(".repeat(10_000)),
        err(
            1,
            1,
            "predicate is 10000 bytes long, more than the limit of 4096 bytes"
        )
    );
}

#[test]
fn source_time_dependence_and_tags_read() {
    let source = "has_tag(\"b\") or (has_tag(\"a\") and not has_tag(\"b\"))\n or channel(\"c\")";
    let predicate = parse(source);
    assert_eq!(predicate.source(), source);
    assert_eq!(predicate.tags_read(), vec!["a".to_owned(), "b".to_owned()]);
    assert!(!predicate.depends_on_time());

    let timed = parse("points > 1 and not (days_since(last_order_at) > 90)");
    assert!(timed.depends_on_time());
    assert!(timed.tags_read().is_empty());
    assert!(parse("days_since(created_at) in (1, 2)").depends_on_time());
    assert!(!parse("attr.days_since == 3 and tier == \"gold\"").depends_on_time());

    assert_eq!(parse(source), parse(source));
    assert_ne!(parse("points > 1"), parse("points >  1"));
}

#[test]
#[allow(clippy::too_many_lines)]
fn malformed_input_never_panics() {
    let malformed = [
        "",
        " ",
        "(",
        ")",
        "((",
        "))",
        "\"",
        "\\",
        "\"\\",
        "\"\\\"",
        ",",
        "==",
        "<=>",
        "!",
        "-",
        "--1",
        "-.",
        "1",
        "1.",
        "é",
        "\u{0}",
        "\u{feff}points > 1",
        "attr",
        "attr.",
        "attr..x",
        "attr.x",
        "attr.x ==",
        "attr.x in",
        "attr.x in (",
        "attr.x in (1",
        "attr.x in (1,",
        "not",
        "not not",
        "not (",
        "has_tag",
        "has_tag(",
        "has_tag(\"",
        "has_tag(\"x\\",
        "has_tag(\"x\"",
        "days_since",
        "days_since(",
        "days_since()",
        "days_since(created_at",
        "days_since(created_at)",
        "tier in (\"a\",,)",
        "points > 1 and",
        "points > 1 or or",
        "points >= 99999999999999999999999999999",
        "points >= -0",
        "points >= 0.0000000000000000000000000001",
        "points >= 0.00000000000000000000000000001",
        "𝒙 == 1",
        "attr.x == \"\u{1F600}",
    ];
    for source in malformed {
        let _ = Predicate::parse(source);
    }
    // Every prefix of a valid predicate, cut at each character.
    let valid = "not (tier >= \"gold\" or attr.city in (\"Köln\", \"a\\\"b\")) and \
                 days_since(last_order_at) <= -30.5 or has_identity(\"phone\")";
    let parsed = parse(valid);
    assert_eq!(
        parsed.reads(),
        Reads::TIER
            .with(Reads::ATTRIBUTES)
            .with(Reads::TIMES)
            .with(Reads::IDENTITIES)
    );
    assert_eq!(
        parsed.day_thresholds(),
        vec![(TimeField::LastOrderAt, -31), (TimeField::LastOrderAt, -30)]
    );
    // A silver customer whose last order is dated 31 days ahead: the city decides, and the
    // escaped quote is read as a quote.
    let in_city = |city: &str| TestProfile {
        tier: Some(1),
        attributes: vec![("city", Value::String(city.to_owned()))],
        days: vec![(TimeField::LastOrderAt, -31)],
        ..TestProfile::default()
    };
    assert_eq!(
        ["x", "Köln", "a\"b"].map(|city| parsed.eval(&in_city(city))),
        [true, false, false]
    );
    for (end, _) in valid.char_indices() {
        let _ = Predicate::parse(&valid[..end]);
    }
    // Deterministic pseudo-random token soup.
    let pieces = [
        "(",
        ")",
        "not ",
        " and ",
        " or ",
        "points",
        "tier",
        "attr.x",
        "days_since(",
        "created_at",
        "has_tag(",
        "\"s\"",
        "\"",
        "\\",
        "1",
        "-2.5",
        " in ",
        ",",
        "==",
        "<",
        ">=",
        "!",
        "=",
        "\n",
        "é",
        "true",
        ".",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..2000 {
        let mut source = String::new();
        for _ in 0..12 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            source.push_str(pieces[(state >> 33) as usize % pieces.len()]);
        }
        if let Ok(predicate) = Predicate::parse(&source) {
            let _ = predicate.eval(&TestProfile::default());
        }
    }
}

#[test]
fn values_round_trip_through_serde() {
    let values = [
        Value::Bool(true),
        Value::Number(dec("12.50")),
        Value::Number(dec("-0.0000001")),
        Value::Number(dec("1234567890123456789.123456789")),
        Value::String("02139".into()),
        Value::String("12.50".into()),
        Value::String("true".into()),
    ];
    for value in values {
        let json = serde_json::to_string(&value).unwrap();
        let back: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back, value, "{json}");
        assert_eq!(
            format!("{back:?}"),
            format!("{value:?}"),
            "scale kept: {json}"
        );
    }
    assert_eq!(
        serde_json::to_string(&Value::Number(dec("12.50"))).unwrap(),
        r#"{"Number":"12.50"}"#
    );
    assert_eq!(
        serde_json::to_string(&Value::String("02139".into())).unwrap(),
        r#"{"String":"02139"}"#
    );
    assert_eq!(
        serde_json::from_str::<Value>(r#"{"Number":"12abc"}"#)
            .unwrap_err()
            .to_string(),
        "invalid value: string \"12abc\", expected a decimal number as text at line 1 column 17"
    );
}

#[test]
fn reads_names_every_part_a_predicate_reads() {
    let reads = parse(
        "tier >= \"gold\" and has_tag(\"coffee\") and days_since(last_order_on(\"douyin\")) <= 30",
    )
    .reads();
    assert_eq!(reads, Reads::TIER.with(Reads::TAGS).with(Reads::TIMES));
    assert!(!reads.intersects(Reads::POINTS.with(Reads::ATTRIBUTES)));
    assert_eq!(
        parse("attr.city == \"x\" or attr.zip == 1").reads(),
        Reads::ATTRIBUTES
    );
    assert_eq!(
        parse("points > 1 or spend_365d > 1 or total_spend > 1 or order_count > 1").reads(),
        Reads::POINTS
            .with(Reads::SPEND_365D)
            .with(Reads::TOTAL_SPEND)
            .with(Reads::ORDER_COUNT)
    );
    assert_eq!(
        parse("channel(\"x\") and has_identity(\"phone\")").reads(),
        Reads::CHANNELS.with(Reads::IDENTITIES)
    );
}
