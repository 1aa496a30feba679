//! Where `days_since` comparisons can change their truth ([`Predicate::day_thresholds`]).

use super::*;

#[test]
fn day_thresholds_are_where_comparisons_can_flip() {
    let p = Predicate::parse(r#"days_since(last_order_at) > 30 or (days_since(created_at) in (7, 14) and not days_since(last_order_at) <= 2.5)"#).unwrap();
    assert_eq!(
        p.day_thresholds(),
        vec![
            (TimeField::LastOrderAt, 2),
            (TimeField::LastOrderAt, 3),
            (TimeField::LastOrderAt, 30),
            (TimeField::LastOrderAt, 31),
            (TimeField::CreatedAt, 7),
            (TimeField::CreatedAt, 8),
            (TimeField::CreatedAt, 14),
            (TimeField::CreatedAt, 15),
        ]
    );
    assert_eq!(
        Predicate::parse("spend_365d > 10")
            .unwrap()
            .day_thresholds(),
        vec![]
    );
}
