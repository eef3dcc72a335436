"""ARC (the AI2 Reasoning Challenge): grade-school science questions with 3 to 5 options. allenai/ai2_arc,
configs 'ARC-Easy' and 'ARC-Challenge'; rows {id, question, choices: {text, label}, answerKey}."""
HUB = 'allenai/ai2_arc'
SPLIT, FEWSHOT_SPLIT, SAMPLER = 'test', 'train', 'random'


def example(row):
    """lm-eval-harness's arc_easy / arc_challenge: 'Question: ...\\nAnswer:' continued by each option's text."""
    labels = row['choices']['label']
    return dict(query=f"Question: {row['question']}\nAnswer:", choices=row['choices']['text'],
                gold=labels.index(row['answerKey']), description='', question=row['question'],
                options=row['choices']['text'], letters=labels)
